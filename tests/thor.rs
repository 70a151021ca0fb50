//! What the Jetson AGX Thor build relies on that can be checked without one: the committed PTX
//! of moescope's kernels is something the Thor's driver can JIT for sm_110 (CUDA 13.0, JetPack
//! 7): a plain (not arch-specific `a`/`f`) target no newer than sm_110, and a PTX ISA no newer
//! than CUDA 13.0's 9.0.

use std::path::PathBuf;

fn ptx_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/model/kernels");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ptx"))
        .collect();
    v.sort();
    v
}

fn directive<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} directive"))
        .trim()
}

#[test]
fn committed_ptx_can_be_jit_compiled_by_the_thor_driver() {
    let files = ptx_files();
    assert!(
        !files.is_empty(),
        "the cuda build embeds src/model/kernels/*.ptx"
    );
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let target = directive(&text, ".target");
        let sm = target
            .strip_prefix("sm_")
            .unwrap_or_else(|| panic!("{}: target {target}", f.display()));
        let num: u32 = sm.parse().unwrap_or_else(|_| {
            panic!(
                "{}: target {target} is arch-specific (a/f suffix): no forward JIT to sm_110",
                f.display()
            )
        });
        assert!(
            (80..=110).contains(&num),
            "{}: sm_{num} (Ampere..Thor expected)",
            f.display()
        );
        let version = directive(&text, ".version");
        let (major, minor) = version.split_once('.').unwrap();
        let v = (major.parse::<u32>().unwrap(), minor.parse::<u32>().unwrap());
        assert!(
            v <= (9, 0),
            "{}: PTX ISA {version} needs a newer driver than CUDA 13.0's",
            f.display()
        );
        assert_eq!(directive(&text, ".address_size"), "64");
    }
}
