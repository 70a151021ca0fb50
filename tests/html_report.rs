//! `moescope export FILE --format html`: one self-contained page, well-formed, carrying the
//! numbers of the JSON export of the same recording.

mod common;

use common::*;

fn export(rel: &str, format: &str) -> String {
    let file = format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"));
    let (rc, out, err) = run(&["export", &file, "--format", format]);
    assert_eq!(rc, 0, "{err}");
    out
}

/// The page parsed as XML (it is written to be), so an unclosed or unescaped element fails.
fn parse(html: &str) -> roxmltree::Document<'_> {
    let body = html
        .strip_prefix("<!DOCTYPE html>\n")
        .expect("starts with the HTML5 doctype");
    roxmltree::Document::parse(body).unwrap_or_else(|e| panic!("not well-formed: {e}"))
}

#[test]
fn the_html_report_is_self_contained_and_carries_the_json_numbers() {
    for rel in [
        "recordings/demo-tiny-moe.ndjson",
        "tests/fixtures/events/perturbed.ndjson",
        "tests/fixtures/events/failed.ndjson",
    ] {
        let html = export(rel, "html");
        let doc = parse(&html);
        let json: serde_json::Value = serde_json::from_str(&export(rel, "json")).unwrap();
        // Nothing fetched: no script, no stylesheet or image by address, no link out.
        for n in doc.descendants().filter(|n| n.is_element()) {
            let tag = n.tag_name().name();
            assert!(
                !["script", "link", "img", "iframe", "object"].contains(&tag),
                "{rel}: <{tag}>"
            );
            for a in n.attributes() {
                assert!(
                    !["src", "href"].contains(&a.name()) && !a.value().contains("url("),
                    "{rel}: <{tag} {}={}>",
                    a.name(),
                    a.value()
                );
            }
        }
        let text: String = doc
            .descendants()
            .filter(|n| n.is_text())
            .map(|n| n.text().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\u{1}");
        let has = |s: &str| assert!(text.contains(s), "{rel}: \"{s}\" missing from the page");
        // The verdict and every criterion's measured value.
        has(json["verdict"]["headline"].as_str().unwrap());
        for c in json["verdict"]["criteria"].as_array().unwrap() {
            has(c["label"].as_str().unwrap());
            if let Some(m) = c["measured"].as_f64() {
                has(&format!("{m:.3}"));
            }
        }
        // Both backends' headline figures and the comparison.
        for b in ["native", "selective"] {
            if let Some(v) = json["backends"][b]["decode_tok_s"].as_f64() {
                has(&format!("{v:.2}"));
            }
            if let Some(v) = json["backends"][b]["load_s"].as_f64() {
                has(&format!("{v:.2}"));
            }
        }
        if let Some(v) = json["comparison"]["memory_reduction_pct"].as_f64() {
            has(&format!("{v:.1} %"));
        }
        if let Some(v) = json["comparison"]["speed_ratio"].as_f64() {
            has(&format!("{v:.3}"));
        }
        // Every prompt: its text and same-token share; and each output's text.
        for p in json["prompts"].as_array().unwrap() {
            has(p["text"].as_str().unwrap());
            if let Some(v) = p["token_agreement"]["identical_pct"].as_f64() {
                has(&format!("{v:.1} %"));
            }
        }
        // The charts are inline SVG elements of the page.
        let svgs = doc
            .descendants()
            .filter(|n| n.tag_name().name() == "svg")
            .count();
        assert!(svgs >= 2, "{rel}: {svgs} charts");
    }
    // All four charts where the run traced its routing and ran a cache.
    let demo = export("recordings/demo-tiny-moe.ndjson", "html");
    assert_eq!(demo.matches("<svg").count(), 4);
    for caption in [
        "memory (RSS + GPU)",
        "decode speed",
        "selective cache",
        "belady (optimum)",
    ] {
        assert!(demo.contains(caption), "{caption}");
    }
}

/// Outputs side by side: the first divergence onwards marked; reasoning apart from the answer.
#[test]
fn the_html_report_marks_the_divergence_and_the_reasoning() {
    let html = export("tests/fixtures/events/thinking.ndjson", "html");
    parse(&html);
    assert!(
        html.contains("<mark>"),
        "selective diverges in this fixture"
    );
    assert!(html.contains("class=\"think\""));
    assert!(html.contains("diverge at token"));
    let html = export("recordings/demo-tiny-moe.ndjson", "html");
    assert!(
        !html.contains("<mark>"),
        "identical outputs: nothing marked"
    );
}

#[test]
fn html_goes_to_a_file_with_dash_o() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report.html");
    let file = format!(
        "{}/recordings/demo-tiny-moe.ndjson",
        env!("CARGO_MANIFEST_DIR")
    );
    let (rc, _, err) = run(&[
        "export",
        &file,
        "--format",
        "html",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{err}");
    parse(&std::fs::read_to_string(&out).unwrap());
}
