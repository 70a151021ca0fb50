//! What the token inspector reads, recorded by a real run: per position of native's output both
//! backends' top-5 tokens and the KL (from the quality check), and per selective token the
//! experts its step loaded — which add up to the cache's misses.

mod common;

use common::*;
use moescope::session::record;
use moescope::session::state::SessionState;

#[test]
fn a_run_records_alternatives_and_the_loads_of_each_token() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("r.ndjson");
    let (rc, _, err) = run(&[
        "run",
        "--no-tui",
        "--max-new-tokens",
        "10",
        "--cache-experts",
        "40",
        "--reference",
        "none",
        "--record",
        rec.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{err}");
    let r = record::read(&rec).unwrap();
    let s = SessionState::replayed(&r);
    let moe_layers = &s.header.moe.moe_layers;
    for p in 0..s.num_prompts() {
        let native = &s.backends[0].runs[p].tokens;
        let alts = s.alternatives[p].as_ref().expect("every prompt was scored");
        assert_eq!(alts.len(), native.len(), "prompt {p}: one entry per token");
        for (i, d) in alts.iter().enumerate() {
            assert_eq!(d.native.len(), 5);
            assert_eq!(d.selective().len(), 5);
            // Native's greedy token is its own top choice, ranked first, probabilities falling.
            assert_eq!(d.native[0].id, native[i].id, "prompt {p} token {i}");
            assert!(d.native.windows(2).all(|w| w[0].p >= w[1].p));
            assert!(d.native.iter().map(|a| a.p).sum::<f32>() <= 1.0 + 1e-4);
            assert!(d.native.iter().all(|a| !a.text.is_empty() || a.id < 3));
            // Selective is bit-identical here: the same distribution (recorded once), KL 0.
            assert!(d.selective.is_empty(), "prompt {p} token {i}");
            assert_eq!(d.native, d.selective());
            assert_eq!(d.kl, 0.0);
        }
    }
    // Every selective token says what its step loaded, within what it routed; together they
    // are the cache's misses (scoring and warm-up bypass the cache).
    let mut loaded = 0;
    for p in 0..s.num_prompts() {
        for t in &s.backends[1].runs[p].tokens {
            assert!(t.load_us.is_some());
            let pos = t.position.expect("routing traced before each token");
            let step = s.traces[1]
                .iter()
                .find(|x| x.prompt == p && x.position == pos)
                .unwrap();
            if !t.prefill {
                for &(layer, e) in &t.loaded {
                    let li = moe_layers
                        .iter()
                        .position(|&l| l == layer as usize)
                        .unwrap();
                    assert!(step.experts[li].contains(&e), "loaded what it routed");
                }
            }
            loaded += t.loaded.len();
        }
        for t in &s.backends[0].runs[p].tokens {
            assert!(
                t.loaded.is_empty() && t.load_us.is_none(),
                "native loads nothing"
            );
        }
    }
    let misses = s.backends[1].cache.as_ref().unwrap().misses;
    assert!(loaded > 0);
    assert_eq!(loaded as u64, misses);
}
