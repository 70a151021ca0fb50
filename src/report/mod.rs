//! Every output format in one place, each a function of plain results: the session summary as
//! JSON and markdown, the headless final table, the sweep and simulate tables, routing traces.

pub mod trace;
