//! The parent's side of a worker: spawn `moescope worker`, tokio tasks owning its pipes, crash
//! detection (exit code or signal, with the last lines of its stderr).

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::protocol::{Command, WorkerEvent};
use crate::session::event::Backend;

/// What the parent hears from a worker.
#[derive(Debug, Clone)]
pub enum WorkerMsg {
    Event(Box<WorkerEvent>),
    /// A stdout line that is not a protocol event.
    BadLine(String),
    /// The worker's last output, cut off before its newline: the process is ending mid-line
    /// (its exit follows at once, and says why).
    TornLine(String),
    /// The process ended.
    Exited {
        status: String,
        stderr_tail: Vec<String>,
    },
}

#[derive(Debug)]
pub struct WorkerProcess {
    pub backend: Backend,
    pub pid: u32,
    cmd_tx: UnboundedSender<Command>,
}

const STDERR_TAIL: usize = 12;

impl WorkerProcess {
    /// Starts `exe worker` with extra environment variables, on `cpus` when given (see
    /// [`super::cpus`]); its messages go to `events`.
    pub fn spawn(
        backend: Backend,
        exe: &Path,
        env: &[(String, String)],
        cpus: Option<&[usize]>,
        events: UnboundedSender<(Backend, WorkerMsg)>,
    ) -> std::io::Result<Self> {
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: the terminal's Ctrl-C or hang-up reaches only the
            // dashboard, which stops the workers itself and records why.
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(c) = cpus {
            for (k, v) in super::cpus::thread_env(c.len()) {
                cmd.env(k, v);
            }
        }
        #[cfg(target_os = "linux")]
        let cpus: Option<Vec<usize>> = cpus.map(<[usize]>::to_vec);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the worker if
        // this process dies, so a crashed or killed dashboard leaves no orphans.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // Its share of the cores; the set was built before the fork (no allocation
                // here). A refusal leaves it on every core: slower to measure, not wrong.
                if let Some(cpus) = &cpus {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    for &c in cpus {
                        libc::CPU_SET(c, &mut set);
                    }
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::new(Mutex::new(VecDeque::new()));

        let (cmd_tx, mut cmd_rx): (UnboundedSender<Command>, UnboundedReceiver<Command>) =
            unbounded_channel();
        tokio::spawn(async move {
            while let Some(c) = cmd_rx.recv().await {
                let mut line = serde_json::to_string(&c).expect("command serialises");
                line.push('\n');
                if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
        });

        let tail_w = tail.clone();
        let stderr_task = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let mut t = tail_w.lock().expect("tail lock");
                t.push_back(l);
                while t.len() > STDERR_TAIL {
                    t.pop_front();
                }
            }
        });

        tokio::spawn(async move {
            // Bytes, not `lines()`: a line that is not UTF-8 (a worker dying mid-character)
            // must be reported as a bad line, not end the reading.
            let mut out = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match out.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let torn = !buf.ends_with(b"\n");
                let l = String::from_utf8_lossy(&buf);
                let l = l.trim_end_matches(['\n', '\r']).to_string();
                let msg = match serde_json::from_str::<WorkerEvent>(&l) {
                    Ok(ev) => WorkerMsg::Event(Box::new(ev)),
                    Err(_) if torn => WorkerMsg::TornLine(l),
                    Err(_) => WorkerMsg::BadLine(l),
                };
                if events.send((backend, msg)).is_err() {
                    break;
                }
            }
            let status = match child.wait().await {
                Ok(s) => describe_status(s),
                Err(e) => format!("could not be waited for: {e}"),
            };
            let _ = stderr_task.await;
            let stderr_tail = tail.lock().expect("tail lock").iter().cloned().collect();
            let _ = events.send((
                backend,
                WorkerMsg::Exited {
                    status,
                    stderr_tail,
                },
            ));
        });
        Ok(WorkerProcess {
            backend,
            pid,
            cmd_tx,
        })
    }

    /// Queues a command; false if the worker's stdin is gone.
    pub fn send(&self, c: Command) -> bool {
        self.cmd_tx.send(c).is_ok()
    }

    /// SIGKILL (used when a worker stops answering).
    pub fn kill(&self) {
        if self.pid > 0 {
            // SAFETY: plain syscall; at worst the pid is already gone.
            unsafe {
                libc::kill(self.pid as i32, libc::SIGKILL);
            }
        }
    }
}

fn describe_status(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = s.signal() {
        let name = match sig {
            libc::SIGKILL => " (SIGKILL: killed, e.g. by kill -9 or the out-of-memory killer)",
            libc::SIGSEGV => " (SIGSEGV)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGTERM => " (SIGTERM)",
            _ => "",
        };
        format!("killed by signal {sig}{name}")
    } else {
        format!("exited with code {}", s.code().unwrap_or(-1))
    }
}
