//! Which cores each worker may use. Under the alternate and parallel schedules both workers are
//! alive at once; on the CPU they then get half of the allowed cores each, and as many compute
//! threads as cores. Why: candle's CPU thread pool busy-waits ~1 ms after every operation, so
//! a worker waiting for its turn spun on the core the other needed — on a 2-core machine that
//! moved the measured speed ratio between 0.42 and 0.77 from run to run (BENCHMARKS.md §9), and
//! a pool of two threads on one core is several times slower still. Split, each backend is
//! measured alone on its half of the machine.

/// The cores this process may run on, ascending.
pub fn allowed() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel fills it for pid 0 (us).
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
                let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                    .filter(|&c| libc::CPU_ISSET(c, &set))
                    .collect();
                if !cpus.is_empty() {
                    return cpus;
                }
            }
        }
    }
    (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
}

/// The cores of two workers alive at once: the first half and the rest. None with fewer than
/// two cores (then they share the one).
pub fn split(allowed: &[usize]) -> Option<[Vec<usize>; 2]> {
    if allowed.len() < 2 {
        return None;
    }
    let half = allowed.len() / 2;
    Some([allowed[..half].to_vec(), allowed[half..].to_vec()])
}

/// The environment that sizes a worker's compute threads to its cores (rayon's and candle's
/// own variables: the worker itself reads neither).
pub fn thread_env(cores: usize) -> Vec<(String, String)> {
    let n = cores.max(1).to_string();
    vec![
        ("RAYON_NUM_THREADS".into(), n.clone()),
        ("CANDLE_NUM_THREADS".into(), n),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_workers_get_disjoint_halves() {
        assert_eq!(split(&[0, 1]), Some([vec![0], vec![1]]));
        assert_eq!(split(&[2, 3, 5, 7, 11]), Some([vec![2, 3], vec![5, 7, 11]]));
        assert_eq!(split(&[4]), None);
        assert_eq!(split(&[]), None);
    }

    #[test]
    fn this_process_has_cores() {
        let a = allowed();
        assert!(!a.is_empty());
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }
}
