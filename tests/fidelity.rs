//! The forward pass against HF transformers' outputs on the same files (tests/fixtures, made by
//! scripts/make_fixtures.py).

mod common;

use common::*;
use moescope::engine::{DeviceSpec, Dtype, Engine, ModelFiles};
use moescope::model::ports::NoObserver;
use moescope::model::qwen3_moe::Logits;

fn native(name: &str, dtype: Dtype) -> Engine {
    let files = ModelFiles::open(&fixture(name)).unwrap();
    Engine::native(&files, dtype, &DeviceSpec::cpu(), false, |_, _| {}).unwrap()
}

#[test]
fn f32_final_logits_match_transformers() {
    for name in FAMILIES {
        let g = golden(name);
        let e = native(name, Dtype::F32);
        for (seq, want) in g.sequences.iter().zip(&g.logits_f32) {
            let got = last_logits(&e, seq);
            let d = max_abs_diff(&got, want);
            eprintln!("{name} f32 seq len {}: max abs diff {d:e}", seq.len());
            assert!(
                d <= F32_LOGIT_TOLERANCE,
                "{name} seq len {}: max abs diff {d}",
                seq.len()
            );
        }
    }
}

#[test]
fn f32_all_position_logits_match_transformers() {
    for name in FAMILIES {
        let g = golden(name);
        let e = native(name, Dtype::F32);
        let mut cache = e.model.new_cache();
        let l: Vec<Vec<f32>> = e
            .model
            .forward(
                &g.sequences[2],
                &mut cache,
                e.provider.as_ref(),
                &mut NoObserver,
                Logits::All,
            )
            .unwrap()
            .to_vec2()
            .unwrap();
        for (i, (got, want)) in l.iter().zip(&g.all_logits_f32).enumerate() {
            let d = max_abs_diff(got, want);
            assert!(
                d <= F32_LOGIT_TOLERANCE,
                "{name} position {i}: max abs diff {d}"
            );
        }
    }
}

#[test]
fn kv_cache_decode_matches_full_prefill() {
    // Token-by-token decoding through the KV cache must give the logits of a full forward.
    for name in FAMILIES {
        let g = golden(name);
        let e = native(name, Dtype::F32);
        let seq = &g.sequences[2];
        let mut cache = e.model.new_cache();
        let mut last = Vec::new();
        for (i, &t) in seq.iter().enumerate() {
            let l = e
                .model
                .forward(
                    &[t],
                    &mut cache,
                    e.provider.as_ref(),
                    &mut NoObserver,
                    Logits::Last,
                )
                .unwrap();
            last = l.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            let d = max_abs_diff(&last, &g.all_logits_f32[i]);
            assert!(d <= F32_LOGIT_TOLERANCE, "{name} step {i}: {d}");
        }
        assert_eq!(cache.len(), seq.len());
        assert!(max_abs_diff(&last, &g.logits_f32[2]) <= F32_LOGIT_TOLERANCE);
    }
}

#[test]
fn greedy_continuations_are_identical() {
    for name in FAMILIES {
        let g = golden(name);
        let e = native(name, Dtype::F32);
        for case in &g.greedy {
            let mut cache = e.model.new_cache();
            let mut next = case.prompt.clone();
            let mut out = Vec::new();
            for _ in 0..case.tokens.len() {
                let l = e
                    .model
                    .forward(
                        &next,
                        &mut cache,
                        e.provider.as_ref(),
                        &mut NoObserver,
                        Logits::Last,
                    )
                    .unwrap();
                let row: Vec<f32> = l.squeeze(0).unwrap().to_vec1().unwrap();
                let t = moescope::model::layers::argmax(&row) as u32;
                out.push(t);
                next = vec![t];
            }
            assert_eq!(out, case.tokens, "{name} prompt {:?}", case.prompt);
        }
    }
}

#[test]
fn routing_observer_sees_transformers_choices() {
    for name in FAMILIES {
        assert_routing_is_golden(&native(name, Dtype::F32), &golden(name), name);
    }
}

/// bf16 tolerance, justified: bf16 keeps 8 significant bits, so every op rounds with relative
/// error up to 2^-9 and errors compound through the layers. transformers itself, in bf16, lands
/// some distance from the f32 reference; we require ours to be no further than twice that
/// distance (plus a small floor for sequences where transformers happens to be very close).
#[test]
fn bf16_logits_are_as_close_as_transformers_bf16() {
    for name in FAMILIES {
        let g = golden(name);
        let e = native(name, Dtype::Bf16);
        for (i, seq) in g.sequences.iter().enumerate() {
            let got = last_logits(&e, seq);
            let ours = max_abs_diff(&got, &g.logits_f32[i]);
            let theirs = max_abs_diff(&g.logits_bf16[i], &g.logits_f32[i]);
            let scale = g.logits_f32[i].iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let bound = 2.0 * theirs + 0.02 * scale;
            eprintln!(
                "{name} bf16 seq {i}: ours {ours:.4} transformers {theirs:.4} |logit| max {scale:.2}"
            );
            assert!(
                ours <= bound,
                "{name} seq {i}: ours {ours} vs transformers-bf16 {theirs} (bound {bound})"
            );
        }
    }
}

#[test]
fn f16_runs_and_stays_close() {
    let g = golden("qwen3-moe-tiny");
    let e = native("qwen3-moe-tiny", Dtype::F16);
    let got = last_logits(&e, &g.sequences[1]);
    let scale = g.logits_f32[1].iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max_abs_diff(&got, &g.logits_f32[1]) <= 0.05 * scale);
}

#[test]
fn tensors_outside_the_text_model_are_never_read() {
    // Shard 3 of the Omni fixture holds only audio_tower, visual, talker and code2wav tensors.
    let files = ModelFiles::open(&fixture("qwen3-omni-tiny")).unwrap();
    let e = Engine::native(&files, Dtype::F32, &DeviceSpec::cpu(), false, |_, _| {}).unwrap();
    let mut cache = e.model.new_cache();
    e.model
        .forward(
            &[1, 2, 3],
            &mut cache,
            e.provider.as_ref(),
            &mut NoObserver,
            Logits::Last,
        )
        .unwrap();
    let opened = files.ckpt.opened_shards();
    assert_eq!(files.ckpt.num_shards(), 3);
    assert!(
        !opened.contains(&"model-00003-of-00003.safetensors".to_string()),
        "{opened:?}"
    );
    let unused = files.ckpt.unused_prefixes(&files.cfg);
    assert!(
        unused.iter().any(|p| p.starts_with("talker"))
            && unused.iter().any(|p| p.starts_with("code2wav")),
        "{unused:?}"
    );
}

/// The GPU attention layout (static head-major buffers attended over whole, rows past the
/// position masked, position taken from a device tensor on one-token steps) run on the CPU in
/// f32: it must match transformers like the CPU layout does — through several capacity
/// doublings (a capacity of 2 grows to 4, 8, 16, 32) and a rewind.
#[test]
fn static_kv_layout_matches_transformers_through_growth_and_rewind() {
    use moescope::model::layers::KvCache;
    for name in FAMILIES {
        let g = golden(name);
        let e = native(name, Dtype::F32);
        let layers = e.cfg.num_hidden_layers;
        let step = |cache: &mut KvCache, toks: &[u32]| -> Vec<f32> {
            e.model
                .forward(
                    toks,
                    cache,
                    e.provider.as_ref(),
                    &mut NoObserver,
                    Logits::Last,
                )
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // Token by token from the first position: every step is device-positioned.
        let seq = &g.sequences[2];
        let mut cache = KvCache::new_static(layers, 2);
        for (i, &t) in seq.iter().enumerate() {
            let got = step(&mut cache, &[t]);
            let d = max_abs_diff(&got, &g.all_logits_f32[i]);
            assert!(d <= F32_LOGIT_TOLERANCE, "{name} static step {i}: {d}");
        }
        assert!(cache.static_capacity() >= seq.len());
        // Prefill (host-positioned) then greedy decode (device-positioned).
        for case in &g.greedy {
            let mut cache = KvCache::new_static(layers, 2);
            let mut next = case.prompt.clone();
            let mut out = Vec::new();
            for _ in 0..case.tokens.len() {
                let t = moescope::model::layers::argmax(&step(&mut cache, &next)) as u32;
                out.push(t);
                next = vec![t];
            }
            assert_eq!(out, case.tokens, "{name} static greedy {:?}", case.prompt);
            // Rewind to the prompt: stale rows past it are masked, then overwritten.
            cache.truncate(case.prompt.len()).unwrap();
            let again = moescope::model::layers::argmax(&step(&mut cache, &[case.tokens[0]]));
            assert_eq!(again as u32, case.tokens[1], "{name} after rewind");
        }
    }
}

/// The comparisons above must be able to fail: a NaN logit is no match for anything, and a
/// greedy pick does not step over it.
#[test]
fn a_nan_logit_fails_every_comparison() {
    assert_eq!(max_abs_diff(&[0.0, f32::NAN], &[0.0, 0.0]), f32::INFINITY);
    assert_eq!(max_abs_diff(&[1.0], &[f32::NAN]), f32::INFINITY);
    assert!(max_abs_diff(&[f32::NAN], &[0.0]) > F32_LOGIT_TOLERANCE);
    assert!(max_abs_diff(&[1.0, 2.0], &[1.0, 2.0 + 3e-5]) > F32_LOGIT_TOLERANCE);
    assert!(max_abs_diff(&[1.0, 2.0], &[1.0, 2.0 + 5e-6]) <= F32_LOGIT_TOLERANCE);
    assert_eq!(moescope::model::layers::argmax(&[1.0, f32::NAN, 2.0]), 1);
    assert_eq!(moescope::model::layers::argmax(&[f32::NAN, 1.0]), 0);
}

/// A generation over what an earlier one left (its KV cache, and on a GPU its graphs) gives the
/// bits of a fresh one, token for token and logit for logit — on the CPU's growing cache, and
/// on the GPU's static layout (run here on the CPU) when the capacity is the fresh prompt's;
/// a capacity the fresh prompt would not have is not taken up.
#[test]
fn generations_over_an_earlier_ones_state_match_fresh_ones() {
    use moescope::model::generate::{DecodeState, Generation};
    use moescope::model::layers::KvCache;
    use moescope::model::sampling::SamplingParams;
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let e = native("qwen3-moe-tiny", dtype);
        let layers = e.cfg.num_hidden_layers;
        let params = |n| SamplingParams {
            max_new_tokens: n,
            ..Default::default()
        };
        // Each step's token and logits' bits, and whether the state was taken up.
        let run = |state: Option<DecodeState>, prompt: &[u32], n: usize| {
            let mut g =
                Generation::reusing(&e.model, state, prompt.to_vec(), params(n), vec![]).unwrap();
            let reused = g.kv_bytes() > 0;
            let mut steps = Vec::new();
            while let Some(out) = g
                .step(&e.model, e.provider.as_ref(), &mut NoObserver)
                .unwrap()
            {
                let bits: Vec<u32> = g
                    .last_logits()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                steps.push((out.token, bits));
            }
            (steps, reused, g.into_state())
        };
        let statik = || Some(DecodeState::from_cache(KvCache::new_static(layers, 2)).unwrap());
        let (a, b) = (vec![3u32, 17, 42], vec![5u32, 9, 11, 30, 2]);
        for layout in ["growing", "static"] {
            let fresh = |p: &[u32], n| match layout {
                "static" => run(statik(), p, n),
                _ => run(None, p, n),
            };
            // A: 3 + 5 rows (static capacity 8); B then fits it (5 rows → 8 fresh).
            let (_, _, state) = fresh(&a, 5);
            let (want, _, _) = fresh(&b, 6);
            let (got, reused, state) = run(Some(state), &b, 6);
            assert!(reused, "{dtype:?} {layout}: the state was not taken up");
            assert!(
                got == want,
                "{dtype:?} {layout}: not the fresh generation's bits"
            );
            // B left 5 + 6 rows (static 16): a 2-token prompt's fresh capacity is 2, so a
            // static state is dropped (the generation starts on the model's own fresh cache);
            // a growing one is still taken up.
            let (want, _, _) = run(None, &a[..2], 3);
            let (got, reused, _) = run(Some(state), &a[..2], 3);
            assert_eq!(reused, layout == "growing", "{dtype:?} {layout}");
            assert!(got == want, "{dtype:?} {layout}: short prompt");
        }
    }
}
