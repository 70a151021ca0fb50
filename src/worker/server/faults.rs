//! Fault injection for the tests: a worker told (through `MOESCOPE_TEST_*` variables, which
//! the parent passes to one backend's worker) to crash, hang, slow down or refuse a prompt at a
//! known point, so fault tests never race the run.

use std::time::Duration;

/// Test hooks, read from the environment: they let fault tests make a worker crash or hang at a
/// known point without racing against it.
pub(super) struct Faults {
    crash_after_tokens: Option<usize>,
    /// Die in the middle of writing a protocol line (half a line out, then SIGKILL).
    tear_line_after_tokens: Option<usize>,
    hang_after_tokens: Option<usize>,
    /// Sleep after every token, so a test can interrupt a run that would otherwise finish
    /// before the signal arrives on a fast machine.
    token_delay: Option<Duration>,
    /// Refuse to generate this prompt (as a prompt the worker cannot tokenize would be).
    pub fail_generate_at_prompt: Option<usize>,
    tokens: usize,
}

impl Faults {
    pub fn from_env() -> Self {
        let n = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
        Faults {
            crash_after_tokens: n("MOESCOPE_TEST_CRASH_AFTER_TOKENS"),
            tear_line_after_tokens: n("MOESCOPE_TEST_TEAR_LINE_AFTER_TOKENS"),
            hang_after_tokens: n("MOESCOPE_TEST_HANG_AFTER_TOKENS"),
            token_delay: n("MOESCOPE_TEST_TOKEN_DELAY_MS")
                .map(|ms: usize| Duration::from_millis(ms as u64)),
            fail_generate_at_prompt: n("MOESCOPE_TEST_FAIL_GENERATE_AT_PROMPT"),
            tokens: 0,
        }
    }

    pub fn on_token(&mut self) {
        self.tokens += 1;
        if let Some(d) = self.token_delay {
            std::thread::sleep(d);
        }
        if self.crash_after_tokens == Some(self.tokens) {
            // SAFETY: raising SIGKILL on ourselves: the same as `kill -9` from outside.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        if self.tear_line_after_tokens == Some(self.tokens) {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(br#"{"ev":"session","type":"token","backend":"nat"#);
            let _ = out.flush();
            // SAFETY: as above.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        if self.hang_after_tokens == Some(self.tokens) {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}
