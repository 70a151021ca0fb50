//! Handing bytes the CPU just wrote to a host→device copy.
//!
//! Why: a staged miss is read by many threads, each leaving its piece as dirty lines in its
//! own core's private cache (2 MiB of L2 a core on the H200 host holds a 9 MiB expert spread
//! over 16 cores). The copy engine then reads the page-locked buffer by snooping those lines out
//! core by core: a lone expert's copy ran at 17–19 GB/s instead of the link's 50+ (BENCHMARKS.md
//! §73). Demoting each line to the shared last-level cache right after it is written lets the
//! copy read at full speed. `cldemote` is a hint, never changes a byte, and executes as a no-op
//! on x86 processors that lack it; it is skipped where CPUID says it is absent, and elsewhere
//! (aarch64: the Thor's host memory is its device memory) nothing is done.

/// Moves the cache lines holding `bytes` out of this core's private caches (x86-64 with
/// `cldemote`); a no-op elsewhere. Call it on the thread that wrote them: the hint acts on the
/// executing core's caches.
#[inline]
pub fn written(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if has_cldemote() {
        // SAFETY: cldemote only reads the addresses to name cache lines; every address passed
        // lies within `bytes` (rounded down to its line, which holds part of `bytes`).
        unsafe { demote_lines(bytes.as_ptr(), bytes.len()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Whether this CPU has `cldemote` (CPUID leaf 7, ECX bit 25), asked once.
#[cfg(target_arch = "x86_64")]
pub fn has_cldemote() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        // Leaf 7 is only valid when leaf 0 says so.
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        __cpuid(0).eax >= 7 && __cpuid_count(7, 0).ecx & (1 << 25) != 0
    })
}

#[cfg(target_arch = "x86_64")]
unsafe fn demote_lines(start: *const u8, len: usize) {
    const LINE: usize = 64;
    let end = start as usize + len;
    let mut line = start as usize & !(LINE - 1);
    while line < end {
        // SAFETY: the caller's contract (a hint on a line that holds part of a live buffer).
        unsafe {
            std::arch::asm!("cldemote [{0}]", in(reg) line, options(nostack, preserves_flags, readonly))
        };
        line += LINE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demoting_leaves_every_byte_as_written() {
        // Unaligned start and end, so the first and last lines are partial.
        let buf: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let want = buf.clone();
        written(&buf[3..9_997]);
        written(&buf[..0]);
        assert_eq!(buf, want);
    }
}
