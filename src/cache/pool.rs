//! The cache's bookkeeping, kept once: which experts are resident and in which slot, the split of
//! the capacity into pools, what the eviction policy is told, and the hit / miss / eviction /
//! prefetch counters. The live cache (`experts::cache`) keeps only the weights in the slots this
//! hands out; the simulator (`sim.rs`) replays traces through the very same calls — so live and
//! simulated hits agree by construction, not by a copy kept in step.
//!
//! Why slots: on a GPU the weights live in a preallocated [slots, …] tensor per pool, on the CPU
//! in a vector of the same length; either way an expert's home is a slot number, and a miss
//! reuses the victim's slot.

use std::collections::{HashMap, HashSet};

use super::policy::{Policy, PolicyKind};
use super::settings::Scope;
use super::stats::LayerStats;

/// Most layers, and most experts per layer, a key can tell apart.
pub const MAX_LAYERS: usize = 1 << 16;
pub const MAX_EXPERTS: usize = 1 << 16;

/// (layer, expert) packed into the opaque key the policies see.
pub fn key(layer: usize, expert: usize) -> u32 {
    debug_assert!(layer < MAX_LAYERS && expert < MAX_EXPERTS);
    ((layer as u32) << 16) | expert as u32
}

pub fn unkey(k: u32) -> (usize, usize) {
    ((k >> 16) as usize, (k & 0xffff) as usize)
}

/// Pool capacities for a total capacity: one pool, or an equal (floored) share per layer.
pub fn split(capacity: usize, scope: Scope, layers: usize) -> Vec<usize> {
    match scope {
        Scope::Global => vec![capacity],
        Scope::Layer => vec![capacity / layers.max(1); layers.max(1)],
    }
}

/// How an expert became resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// After a miss: the expert was asked for.
    Demand,
    /// Ahead of use, on a guess: not a hit, not a miss; its first request is its first use.
    Prefetch,
}

/// Where an admitted expert went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub pool: usize,
    pub slot: usize,
    /// The expert that held the slot before, if one was evicted for it.
    pub evicted: Option<(usize, usize)>,
}

struct Pool {
    capacity: usize,
    slot_of: HashMap<u32, usize>,
    /// Slots given back (by `clear`); fresh ones are handed out in order from `fresh`.
    free: Vec<usize>,
    fresh: usize,
    policy: Box<dyn Policy>,
}

impl Pool {
    fn free_slot(&mut self) -> Option<usize> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        (self.fresh < self.capacity).then(|| {
            self.fresh += 1;
            self.fresh - 1
        })
    }
}

/// Every pool of one cache and its counters.
pub struct Pools {
    pools: Vec<Pool>,
    /// Layer → pool (None: the layer has no experts).
    pool_of: Vec<Option<usize>>,
    /// Layer → its entry in `layers`.
    stats_of: Vec<Option<usize>>,
    layers: Vec<LayerStats>,
    /// With a slot for every expert: each expert's own slot, by layer (see [`Self::use_homes`]).
    homes: Option<Vec<Vec<u32>>>,
    hits: u64,
    misses: u64,
    evictions: u64,
    /// Loaded ahead and not requested since.
    prefetched_unused: HashSet<u32>,
    /// Loaded ahead and evicted before any request.
    prefetch_evicted_unused: u64,
    /// Every miss as (layer, expert), while [`Self::log_misses`] is on (for a per-token view).
    miss_log: Option<Vec<(u16, u16)>>,
    /// Every change of residency as (layer, expert, its slot now or None), while
    /// [`Self::log_changes`] is on: what keeps an exact device copy of the expert→slot tables
    /// (the GPU's gated steps look residency up on the device).
    changes: Option<Vec<(usize, usize, Option<usize>)>>,
}

impl Pools {
    /// Pools for the MoE layers `layers` (any numbering below [`MAX_LAYERS`]: the live cache
    /// uses model layers, the simulator MoE-layer indices), `num_experts` each, holding
    /// `capacity` experts in all, split by `scope`.
    pub fn new(
        layers: &[usize],
        num_experts: usize,
        capacity: usize,
        scope: Scope,
        policy: PolicyKind,
    ) -> Self {
        let size = layers.iter().max().map_or(0, |&l| l + 1);
        let mut pool_of = vec![None; size];
        let mut stats_of = vec![None; size];
        let caps = split(capacity, scope, layers.len());
        for (i, &l) in layers.iter().enumerate() {
            pool_of[l] = Some(if scope == Scope::Global { 0 } else { i });
            stats_of[l] = Some(i);
        }
        Pools {
            pools: caps
                .iter()
                .map(|&c| Pool {
                    capacity: c,
                    slot_of: HashMap::new(),
                    free: Vec::new(),
                    fresh: 0,
                    policy: policy.build(c),
                })
                .collect(),
            pool_of,
            stats_of,
            layers: layers
                .iter()
                .map(|&l| LayerStats::new(l, num_experts))
                .collect(),
            homes: None,
            hits: 0,
            misses: 0,
            evictions: 0,
            prefetched_unused: HashSet::new(),
            prefetch_evicted_unused: 0,
            miss_log: None,
            changes: None,
        }
    }

    /// Starts logging residency changes ([`Self::take_changes`]).
    pub fn log_changes(&mut self) {
        self.changes.get_or_insert_with(Vec::new);
    }

    /// The residency changes since the last call, oldest first (empty when not logging).
    pub fn take_changes(&mut self) -> Vec<(usize, usize, Option<usize>)> {
        self.changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn note_change(&mut self, layer: usize, expert: usize, slot: Option<usize>) {
        if let Some(c) = self.changes.as_mut() {
            c.push((layer, expert, slot));
        }
    }

    /// Every expert's own slot, when every pool holds every expert it serves: the i-th layer a
    /// pool serves owns its slots i·E .. (i+1)·E. `None` when some pool is smaller than that.
    pub fn home_slots(&self, num_experts: usize) -> Option<Vec<Vec<u32>>> {
        let mut home = vec![Vec::new(); self.pool_of.len()];
        for (p, pool) in self.pools.iter().enumerate() {
            let served: Vec<usize> = (0..self.pool_of.len())
                .filter(|&l| self.pool_of[l] == Some(p))
                .collect();
            if pool.capacity < served.len() * num_experts {
                return None;
            }
            for (i, &l) in served.iter().enumerate() {
                home[l] = (0..num_experts)
                    .map(|e| (i * num_experts + e) as u32)
                    .collect();
            }
        }
        Some(home)
    }

    /// From now on every expert is admitted into its own slot (`home_slots`), and nothing is
    /// ever evicted: the GPU can then fill a missing expert's slot itself.
    pub fn use_homes(&mut self, homes: Vec<Vec<u32>>) {
        self.homes = Some(homes);
    }

    pub fn home(&self, layer: usize, expert: usize) -> Option<usize> {
        self.homes
            .as_ref()
            .and_then(|h| h.get(layer)?.get(expert))
            .map(|&s| s as usize)
    }

    /// Whether `layer` has experts (and so a pool).
    pub fn serves(&self, layer: usize) -> bool {
        self.pool_of.get(layer).is_some_and(Option::is_some)
    }

    pub fn pool_of(&self, layer: usize) -> Option<usize> {
        self.pool_of.get(layer).copied().flatten()
    }

    pub fn num_pools(&self) -> usize {
        self.pools.len()
    }

    pub fn pool_capacity(&self, pool: usize) -> usize {
        self.pools[pool].capacity
    }

    /// All pools' capacities together.
    pub fn capacity(&self) -> usize {
        self.pools.iter().map(|p| p.capacity).sum()
    }

    /// Experts resident now.
    pub fn resident(&self) -> usize {
        self.pools.iter().map(|p| p.slot_of.len()).sum()
    }

    /// Where (layer, expert) is resident: (pool, slot).
    pub fn slot(&self, layer: usize, expert: usize) -> Option<(usize, usize)> {
        let p = self.pool_of(layer)?;
        self.pools[p]
            .slot_of
            .get(&key(layer, expert))
            .map(|&s| (p, s))
    }

    pub fn contains(&self, layer: usize, expert: usize) -> bool {
        self.slot(layer, expert).is_some()
    }

    pub fn hits(&self) -> u64 {
        self.hits
    }

    pub fn misses(&self) -> u64 {
        self.misses
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn layer_stats(&self) -> &[LayerStats] {
        &self.layers
    }

    /// Experts loaded ahead that were evicted, or are still resident, without ever being
    /// requested: the bandwidth prefetch spent on wrong guesses.
    pub fn prefetch_wasted(&self) -> u64 {
        self.prefetch_evicted_unused + self.prefetched_unused.len() as u64
    }

    /// A request for (layer, expert) by the forward pass: a hit (the policy is told — as the
    /// expert's first use when a prefetch brought it, since without prefetch this request would
    /// have been its insert) or a miss, counted either way. The slot when resident.
    pub fn request(&mut self, layer: usize, expert: usize) -> Option<(usize, usize)> {
        let li = self.stats_of.get(layer).copied().flatten();
        match self.slot(layer, expert) {
            Some((p, s)) => {
                let k = key(layer, expert);
                if self.prefetched_unused.remove(&k) {
                    self.pools[p].policy.on_first_use(k);
                } else {
                    self.pools[p].policy.on_hit(k);
                }
                self.hits += 1;
                if let Some(li) = li {
                    self.layers[li].hits[expert] += 1;
                }
                Some((p, s))
            }
            None => {
                self.misses += 1;
                if let Some(li) = li {
                    self.layers[li].misses[expert] += 1;
                }
                if let Some(log) = &mut self.miss_log {
                    log.push((layer as u16, expert as u16));
                }
                None
            }
        }
    }

    /// Starts (or stops) logging misses; see [`Self::take_misses`].
    pub fn log_misses(&mut self, on: bool) {
        self.miss_log = on.then(Vec::new);
    }

    /// The misses since the last call, as (layer, expert), in the order they happened.
    pub fn take_misses(&mut self) -> Vec<(u16, u16)> {
        self.miss_log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Makes (layer, expert) resident: its home slot, else a free one, else the slot of the
    /// policy's victim — never one of `pinned` (the keys a kernel call about to run needs; those
    /// the policy offered are given back to it as inserts, as the GPU slot pool always did).
    /// `None` when it is resident already or its pool has no slot to give.
    pub fn admit(
        &mut self,
        layer: usize,
        expert: usize,
        how: Admit,
        pinned: &HashSet<u32>,
    ) -> Option<Admitted> {
        let p = self.pool_of(layer)?;
        let k = key(layer, expert);
        if self.pools[p].capacity == 0 || self.pools[p].slot_of.contains_key(&k) {
            return None;
        }
        let (slot, evicted) = match self.home(layer, expert) {
            Some(h) => (h, None),
            None => match self.pools[p].free_slot() {
                Some(s) => (s, None),
                None => {
                    let (slot, victim) = self.evict_one(p, pinned)?;
                    (slot, Some(victim))
                }
            },
        };
        let pool = &mut self.pools[p];
        pool.slot_of.insert(k, slot);
        match how {
            Admit::Demand => pool.policy.on_insert(k),
            Admit::Prefetch => {
                pool.policy.on_prefetch(k);
                self.prefetched_unused.insert(k);
            }
        }
        if let Some(li) = self.stats_of[layer] {
            self.layers[li].resident[expert] = true;
        }
        if let Some((vl, ve)) = evicted {
            self.note_change(vl, ve, None);
        }
        self.note_change(layer, expert, Some(slot));
        Some(Admitted {
            pool: p,
            slot,
            evicted,
        })
    }

    /// Takes (layer, expert) out without counting an eviction: its slot never got a valid copy
    /// (the load into it failed). The slot is free again.
    pub fn forget(&mut self, layer: usize, expert: usize) {
        let Some(p) = self.pool_of(layer) else { return };
        let k = key(layer, expert);
        if let Some(slot) = self.pools[p].slot_of.remove(&k) {
            self.pools[p].policy.remove(k);
            if self.home(layer, expert).is_none() {
                self.pools[p].free.push(slot);
            }
            self.prefetched_unused.remove(&k);
            if let Some(li) = self.stats_of[layer] {
                self.layers[li].resident[expert] = false;
            }
            self.note_change(layer, expert, None);
        }
    }

    /// Evicts the policy's first victim in pool `p` that is not pinned; its slot and who it was.
    fn evict_one(&mut self, p: usize, pinned: &HashSet<u32>) -> Option<(usize, (usize, usize))> {
        let mut deferred = Vec::new();
        let mut got = None;
        while let Some(v) = self.pools[p].policy.evict() {
            if pinned.contains(&v) {
                deferred.push(v);
                continue;
            }
            if let Some(slot) = self.pools[p].slot_of.remove(&v) {
                got = Some((slot, v));
                break;
            }
        }
        for d in deferred {
            self.pools[p].policy.on_insert(d);
        }
        let (slot, v) = got?;
        self.evictions += 1;
        let (vl, ve) = unkey(v);
        if let Some(li) = self.stats_of.get(vl).copied().flatten() {
            self.layers[li].evictions[ve] += 1;
            self.layers[li].resident[ve] = false;
        }
        if self.prefetched_unused.remove(&v) {
            self.prefetch_evicted_unused += 1;
        }
        Some((slot, (vl, ve)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> HashSet<u32> {
        HashSet::new()
    }

    #[test]
    fn a_miss_is_admitted_into_a_fresh_slot_then_into_the_victims() {
        let mut p = Pools::new(&[1, 3], 4, 2, Scope::Global, PolicyKind::Lru);
        assert!(!p.serves(0) && p.serves(1) && p.serves(3));
        assert_eq!(p.request(1, 0), None);
        let a = p.admit(1, 0, Admit::Demand, &none()).unwrap();
        assert_eq!((a.pool, a.slot, a.evicted), (0, 0, None));
        assert_eq!(p.request(3, 2), None);
        assert_eq!(p.admit(3, 2, Admit::Demand, &none()).unwrap().slot, 1);
        assert_eq!(
            p.request(1, 0),
            Some((0, 0)),
            "hit, and now the most recent"
        );
        assert!(
            p.admit(1, 0, Admit::Demand, &none()).is_none(),
            "already resident"
        );
        let a = p.admit(1, 3, Admit::Demand, &none()).unwrap();
        assert_eq!(
            (a.slot, a.evicted),
            (1, Some((3, 2))),
            "LRU gives up (3, 2)'s slot"
        );
        assert_eq!((p.hits(), p.misses(), p.evictions()), (1, 2, 1));
        let l3 = &p.layer_stats()[1];
        assert_eq!((l3.layer, l3.misses[2], l3.evictions[2]), (3, 1, 1));
        assert!(!l3.resident[2] && p.layer_stats()[0].resident[3]);
        assert_eq!(p.resident(), 2);
    }

    #[test]
    fn layer_scope_splits_the_capacity_and_a_pool_of_none_admits_nothing() {
        let p = Pools::new(&[0, 1], 4, 5, Scope::Layer, PolicyKind::Fifo);
        assert_eq!((p.num_pools(), p.pool_capacity(0), p.capacity()), (2, 2, 4));
        assert_eq!(p.pool_of(1), Some(1));
        let mut p = Pools::new(&[0, 1], 4, 1, Scope::Layer, PolicyKind::Fifo);
        assert_eq!(p.request(0, 0), None);
        assert!(p.admit(0, 0, Admit::Demand, &none()).is_none());
        assert_eq!(p.misses(), 1);
    }

    #[test]
    fn the_change_log_says_every_admission_eviction_and_forgetting_in_order() {
        let mut p = Pools::new(&[0, 1], 4, 2, Scope::Global, PolicyKind::Lru);
        let none = HashSet::new();
        p.admit(0, 1, Admit::Demand, &none).unwrap();
        assert!(p.take_changes().is_empty(), "not logging yet");
        p.log_changes();
        p.admit(0, 2, Admit::Demand, &none).unwrap();
        let a = p.admit(1, 3, Admit::Demand, &none).unwrap();
        assert_eq!(a.evicted, Some((0, 1)));
        p.forget(0, 2);
        assert_eq!(
            p.take_changes(),
            vec![
                (0, 2, Some(1)),
                (0, 1, None),
                (1, 3, Some(a.slot)),
                (0, 2, None)
            ]
        );
        assert!(p.take_changes().is_empty(), "taken");
    }

    #[test]
    fn pinned_keys_are_not_evicted_and_go_back_to_the_policy() {
        let mut p = Pools::new(&[0], 4, 2, Scope::Global, PolicyKind::Lru);
        for e in [0, 1] {
            p.request(0, e);
            p.admit(0, e, Admit::Demand, &none());
        }
        let pinned: HashSet<u32> = [key(0, 0)].into();
        let a = p.admit(0, 2, Admit::Demand, &pinned).unwrap();
        assert_eq!(a.evicted, Some((0, 1)), "the least recent, 0, is pinned");
        // 0 was offered and given back as an insert, just before 2 went in: next in line.
        let a = p.admit(0, 3, Admit::Demand, &none()).unwrap();
        assert_eq!(a.evicted, Some((0, 0)));
        let all: HashSet<u32> = [key(0, 2), key(0, 3)].into();
        assert!(
            p.admit(0, 1, Admit::Demand, &all).is_none(),
            "everything pinned"
        );
    }

    #[test]
    fn a_prefetched_expert_is_neither_hit_nor_miss_and_its_first_request_is_its_first_use() {
        let mut p = Pools::new(&[0], 8, 4, Scope::Global, PolicyKind::S3fifo);
        p.admit(0, 5, Admit::Prefetch, &none()).unwrap();
        assert_eq!((p.hits(), p.misses(), p.prefetch_wasted()), (0, 0, 1));
        assert!(p.request(0, 5).is_some());
        assert_eq!((p.hits(), p.prefetch_wasted()), (1, 0));
        // A guess evicted unrequested is wasted.
        p.admit(0, 6, Admit::Prefetch, &none()).unwrap();
        for e in 0..4 {
            p.request(0, e);
            p.admit(0, e, Admit::Demand, &none());
        }
        assert!(!p.contains(0, 6));
        assert_eq!(p.prefetch_wasted(), 1);
    }

    #[test]
    fn homes_exist_only_when_every_pool_holds_all_it_serves() {
        // Global scope: one pool serving layers 1 and 3 of a model with a dense layer 0.
        let p = Pools::new(&[1, 3], 4, 8, Scope::Global, PolicyKind::Lru);
        let home = p.home_slots(4).expect("8 slots hold 2 × 4 experts");
        assert_eq!(home[0], Vec::<u32>::new());
        assert_eq!(home[1], [0, 1, 2, 3]);
        assert_eq!(home[3], [4, 5, 6, 7]);
        let short = Pools::new(&[1, 3], 4, 7, Scope::Global, PolicyKind::Lru);
        assert!(short.home_slots(4).is_none(), "one slot short");
        // Layer scope: a pool per layer, each its own 0..E.
        let mut p = Pools::new(&[0, 1], 4, 8, Scope::Layer, PolicyKind::Lru);
        let home = p.home_slots(4).unwrap();
        assert_eq!(home, [vec![0, 1, 2, 3], vec![0, 1, 2, 3]]);
        assert!(
            Pools::new(&[0, 1], 4, 7, Scope::Layer, PolicyKind::Lru)
                .home_slots(4)
                .is_none()
        );
        p.use_homes(home);
        assert_eq!(p.admit(1, 2, Admit::Demand, &none()).unwrap().slot, 2);
        assert_eq!(p.admit(1, 0, Admit::Demand, &none()).unwrap().slot, 0);
    }
}
