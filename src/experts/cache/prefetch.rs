//! Next-layer prefetch on the CPU: while layer L computes, a background thread loads what layer
//! L+1's router picked from layer L's hidden state. A guess whose layer has started before the
//! thread got to it is dropped (loading it then would only evict something for nobody), and
//! each guess is scored against what its layer then needed, as the simulator scores them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{CachedProvider, State};
use crate::cache::pool::{Admit, key};
use crate::cache::stats::PrefetchStats;
use crate::model::error::Result;

/// A prefetch request: load these experts of this layer, for the guess numbered so.
pub(super) type Job = (usize, Vec<usize>, u64);

/// The guesses in flight and how good they were.
#[derive(Default)]
pub(super) struct Guesses {
    pub stats: PrefetchStats,
    /// The latest guess for each layer (its number, the experts), scored when that layer runs;
    /// a job whose guess is no longer here is late and is dropped.
    pub latest: HashMap<usize, (u64, Vec<usize>)>,
    pub seq: u64,
}

impl CachedProvider {
    /// Loads an expert in the background (prefetch): no hit/miss is counted, and nothing
    /// happens if it is already resident or being loaded, if its pool has no slot to keep it
    /// in — or, when `guess` is given, if that guess is no longer the layer's latest (the layer
    /// has started: loading now would only evict something for an expert nobody waits for).
    pub fn prefetch(&self, layer: usize, expert: usize, guess: Option<u64>) -> Result<()> {
        let k = key(layer, expert);
        {
            let mut s = self.lock();
            if let (Some(g), Some(p)) = (guess, s.prefetch.as_mut())
                && p.latest.get(&layer).map(|x| x.0) != Some(g)
            {
                p.stats.late += 1;
                return Ok(());
            }
            let Some(pool) = s.pools.pool_of(layer) else {
                return Ok(());
            };
            if s.pools.pool_capacity(pool) == 0
                || s.pools.contains(layer, expert)
                || s.loading.contains(&k)
            {
                return Ok(());
            }
            s.loading.insert(k);
        }
        self.load(layer, expert, Admit::Prefetch).map(|_| ())
    }

    /// Starts the prefetch thread: it loads guessed experts into the cache while the forward pass
    /// computes. It holds only a weak reference, so dropping the provider ends it.
    pub fn start_prefetch(this: &Arc<Self>) {
        if this.lock().gpu.is_some() {
            // GPU slot pools are filled by the fused path on the compute stream; background
            // loading into them is not implemented, so prefetch stays off there.
            eprintln!(
                "moescope: --prefetch next-layer is not available with GPU slot pools; running without it"
            );
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        if this.prefetcher.set(Mutex::new(tx)).is_err() {
            return;
        }
        this.lock().prefetch = Some(Guesses::default());
        let weak = Arc::downgrade(this);
        std::thread::Builder::new()
            .name("moescope-prefetch".into())
            .spawn(move || {
                while let Ok((layer, experts, guess)) = rx.recv() {
                    let Some(me) = weak.upgrade() else { break };
                    for e in experts {
                        // A failed prefetch is not an error: the forward pass will load it.
                        let _ = me.prefetch(layer, e, Some(guess));
                    }
                }
            })
            .expect("spawning the prefetch thread");
    }

    /// A guess of `layer`'s experts: becomes the layer's latest and is queued for loading.
    pub(super) fn hint(&self, layer: usize, experts: &[usize]) {
        let Some(tx) = self.prefetcher.get() else {
            return;
        };
        let wanted: Vec<usize> = experts
            .iter()
            .copied()
            .filter(|e| !self.unavailable[layer].contains(e))
            .collect();
        let seq = {
            let mut s = self.lock();
            let p = s.prefetch.get_or_insert_with(Guesses::default);
            p.seq += 1;
            p.latest.insert(layer, (p.seq, wanted.clone()));
            p.seq
        };
        let _ = tx
            .lock()
            .expect("prefetch sender")
            .send((layer, wanted, seq));
    }

    /// `layer` runs, needing `needed`: its latest guess is scored and retired.
    pub(super) fn score_guess(&self, layer: usize, needed: &[usize]) {
        let mut s = self.lock();
        let State { prefetch, .. } = &mut *s;
        if let Some(p) = prefetch.as_mut()
            && let Some((_, guess)) = p.latest.remove(&layer)
        {
            p.stats.score(&guess, needed);
        }
    }
}
