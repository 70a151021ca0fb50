//! Each backend in its own child process speaking JSON lines, and the parent's side: spawning,
//! pipes, memory sampling and the scheduler that turns worker output into session events.

pub mod cpus;
pub mod memory;
pub mod process;
pub mod protocol;
pub mod reference;
pub mod scheduler;
pub mod server;
