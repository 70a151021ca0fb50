//! How long one staged miss's read takes, outside moescope: a 9 MiB expert (Qwen3-30B-A3B's
//! bf16 size) read out of the page cache by rayon's threads in the pieces the staged path uses
//! (`experts::source::read_pieces`: about two a thread, 256 KiB to 1 MiB), back to back or
//! after a pause, as a decode step reads a lone miss between waits on the device
//! (BENCHMARKS.md §85).
//!
//! ```sh
//! cargo build --release --example staged_read
//! B=target/release/examples/staged_read
//! $B /dev/shm/x write 40                 # a 40 GiB file of varied bytes (tmpfs: page cache)
//! $B /dev/shm/x random 0 400 16          # 400 reads at random 9 MiB offsets, back to back
//! $B /dev/shm/x random 3000 300 16 spin  # 3 ms between reads, the caller spinning
//! $B /dev/shm/x random 3000 300 16 spin 100  # ... the readers woken 100 µs before each read
//! ```
//! Prints the median read time (the first tenth dropped) and its rate. Modes: `random`
//! (anywhere in the file), `window` (the first GiB, in turn), `same` (the first expert).
//! `MLOCK=1` locks the two destination buffers, as page-locked staging buffers are.

use rayon::prelude::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const EXPERT: usize = 3 * 2048 * 768 * 2;

/// Bumped as each read starts: readers woken early spin until then.
static READS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
struct Dst(*mut u8);
// SAFETY: each piece writes its own range of the buffer.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}
impl Dst {
    fn at(&self, i: usize) -> *mut u8 {
        self.0.wrapping_add(i)
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: staged_read FILE write GIB | FILE random|window|same GAP_US N THREADS [spin [PREWAKE_US]]"
    );
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(a: &[String], i: usize) -> T {
    a.get(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage())
}

fn write(path: &str, gib: usize) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let chunk = 64usize << 20;
    (0..(gib << 30) / chunk).into_par_iter().try_for_each(|i| {
        let buf: Vec<u8> = (0..chunk)
            .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i * 7919) >> 7) as u8)
            .collect();
        f.write_all_at(&buf, (i * chunk) as u64)
    })?;
    println!("wrote {gib} GiB to {path}");
    Ok(())
}

fn main() -> std::io::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let (path, mode) = (
        a.get(1).unwrap_or_else(|| usage()),
        a.get(2).map(String::as_str),
    );
    if mode == Some("write") {
        return write(path, arg(&a, 3));
    }
    let mode = mode.unwrap_or_else(|| usage());
    let (gap_us, n, threads): (u64, usize, usize) = (arg(&a, 3), arg(&a, 4), arg(&a, 5));
    let spin = a.get(6).is_some_and(|s| s == "spin");
    let prewake: u64 = if a.len() > 7 { arg(&a, 7) } else { 0 };
    let f = File::open(path)?;
    let experts = f.metadata()?.len() as usize / EXPERT;
    if experts == 0 || n == 0 || threads == 0 {
        usage();
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(std::io::Error::other)?;
    let piece = EXPERT.div_ceil(2 * threads).clamp(256 << 10, 1 << 20) & !1;
    let mut bufs = vec![vec![0u8; EXPERT]; 2];
    if std::env::var_os("MLOCK").is_some() {
        for b in &bufs {
            // SAFETY: locks the pages of a live buffer.
            if unsafe { libc::mlock(b.as_ptr().cast(), b.len()) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    let pieces: Vec<usize> = (0..EXPERT).step_by(piece).collect();
    let window = ((1usize << 30) / EXPERT).clamp(1, experts);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let e = match mode {
            "window" => i % window,
            "same" => 0,
            "random" => state as usize % experts,
            _ => usage(),
        };
        let off = e * EXPERT;
        let dst = Dst(bufs[i % 2].as_mut_ptr());
        let fd = f.as_raw_fd();
        READS.fetch_add(1, Ordering::SeqCst);
        let t = Instant::now();
        pool.install(|| {
            pieces.par_iter().try_for_each(|&at| {
                let len = piece.min(EXPERT - at);
                let mut done = 0;
                while done < len {
                    // SAFETY: within this piece of a live buffer of EXPERT bytes.
                    let r = unsafe {
                        libc::pread(
                            fd,
                            dst.at(at + done).cast(),
                            len - done,
                            (off + at + done) as i64,
                        )
                    };
                    if r <= 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    done += r as usize;
                }
                Ok(())
            })
        })?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        let gap = Duration::from_micros(gap_us);
        if gap_us > 0 && spin {
            let s = Instant::now();
            let mut woken = prewake == 0;
            while s.elapsed() < gap {
                if !woken && s.elapsed() + Duration::from_micros(prewake) >= gap {
                    woken = true;
                    let seen = READS.load(Ordering::SeqCst);
                    pool.spawn_broadcast(move |_| {
                        let st = Instant::now();
                        while READS.load(Ordering::Relaxed) == seen
                            && st.elapsed() < Duration::from_millis(1)
                        {
                            std::hint::spin_loop();
                        }
                    });
                }
            }
        } else if gap_us > 0 {
            std::thread::sleep(gap);
        }
    }
    let mut t = times[n / 10..].to_vec();
    t.sort_by(f64::total_cmp);
    let median = t[t.len() / 2];
    println!(
        "{path} {mode}, gap {gap_us} µs{}, {threads} threads, {} reads: median {median:.0} µs ({:.1} GB/s), p10 {:.0}, p90 {:.0}",
        if spin {
            format!(" (caller spinning, readers woken {prewake} µs before)")
        } else {
            String::new()
        },
        t.len(),
        EXPERT as f64 / median / 1e3,
        t[t.len() / 10],
        t[t.len() * 9 / 10],
    );
    Ok(())
}
