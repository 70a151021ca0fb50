//! Eviction policies behind one trait. The live cache and the offline simulator (`simulate`) use
//! the same implementations, so a simulated hit rate is the hit rate the cache would have had.
//!
//! Keys are opaque `u32`s (the cache packs (layer, expert) into one). Each policy tracks only the
//! keys currently resident; the cache tells it about hits, inserts and removals, and asks it for
//! a victim when full.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

/// The policies moescope ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// Least frequently used (ties: least recently used).
    Lfu,
    /// First in, first out.
    Fifo,
    /// S3-FIFO (Yang et al., SOSP '23): a small probationary FIFO, a main FIFO with reinsertion,
    /// and a ghost queue of recently evicted keys.
    S3fifo,
    /// Expected next use: evicts the key whose next use is furthest away, reckoned from where
    /// its layer comes in the forward pass's cycle and how often it has been picked per visit of
    /// its layer (counts kept across evictions).
    NextUse,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Lru,
        PolicyKind::Lfu,
        PolicyKind::Fifo,
        PolicyKind::S3fifo,
        PolicyKind::NextUse,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Lfu => "lfu",
            PolicyKind::Fifo => "fifo",
            PolicyKind::S3fifo => "s3fifo",
            PolicyKind::NextUse => "next-use",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            PolicyKind::Lru => "Least recently used",
            PolicyKind::Lfu => "Least frequently used (ties: least recently used)",
            PolicyKind::Fifo => "First in, first out",
            PolicyKind::S3fifo => {
                "S3-FIFO (Yang et al., SOSP '23): a small probationary FIFO, a main FIFO with \
                 reinsertion, and a ghost queue of recently evicted keys"
            }
            PolicyKind::NextUse => {
                "Expected next use: the layer's place in the forward pass's cycle plus how often \
                 the expert is picked per visit of its layer (counts kept across evictions)"
            }
        }
    }

    pub fn build(self, capacity: usize) -> Box<dyn Policy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::Lfu => Box::new(Lfu::default()),
            PolicyKind::Fifo => Box::new(Fifo::default()),
            PolicyKind::S3fifo => Box::new(S3Fifo::new(capacity)),
            PolicyKind::NextUse => Box::new(NextUse::default()),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }
}

pub trait Policy: Send {
    /// A resident key was used.
    fn on_hit(&mut self, key: u32);
    /// A key became resident.
    fn on_insert(&mut self, key: u32);
    /// A key became resident ahead of use (a prefetch guess). Default: as an insert.
    fn on_prefetch(&mut self, key: u32) {
        self.on_insert(key);
    }
    /// A prefetched key was used for the first time. Why apart from a hit: without prefetch
    /// this use would have been the key's insert, so a policy that counts uses must not take it
    /// for a second one — S3-FIFO would promote every right guess into its main queue, and LFU
    /// would rank it above experts used twice. Default: a hit (LRU: recency is all it keeps).
    fn on_first_use(&mut self, key: u32) {
        self.on_hit(key);
    }
    /// Chooses a resident key to evict (and forgets it). `None` only when nothing is resident.
    fn evict(&mut self) -> Option<u32>;
    /// A key left for another reason (e.g. the cache was cleared).
    fn remove(&mut self, key: u32);
}

/// Expected next use. Keys are requested layer after layer, token after token, so an expert of
/// layer `j` can next be wanted when the pass reaches `j` again — `d` layer visits from the last
/// request's layer `c` (`d = (j − c) mod L`, a full cycle `L` for `c` itself) — and then with
/// the probability `p` it has been picked per visit of its layer so far; its expected next use
/// is `d + L·(1/p − 1)` layer visits away, and the furthest goes (Belady's rule with a forecast
/// in place of the future). Why: on a trained model's routing the best recency and frequency
/// policies reach about half of Belady's hits at 25 % (BENCHMARKS §3), frequency alone with
/// perfect knowledge two thirds; the cycle position says which of two equally frequent experts
/// comes back sooner. Everything is learnt from the keys: a visit is a run of requests of one
/// layer, `L` is the highest layer seen plus one. Use counts survive eviction (an expert's
/// popularity is a property of the model and the prompt, not of its stay in the cache).
#[derive(Default)]
pub struct NextUse {
    /// Uses of every key seen.
    uses: HashMap<u32, u32>,
    /// Visits of each layer seen.
    visits: Vec<u32>,
    /// Each layer's residents, fewest uses first (ties: the larger key first). Within a layer
    /// `d` is shared and the score falls as uses rise, so a layer's first is its best victim and
    /// an eviction compares one candidate per layer: O(layers · log n), not a scan of the cache.
    by_layer: Vec<BTreeSet<(u32, std::cmp::Reverse<u32>)>>,
    resident: HashSet<u32>,
    last_layer: Option<usize>,
}

impl NextUse {
    fn layer_of(&mut self, key: u32) -> usize {
        let (layer, _) = super::pool::unkey(key);
        if self.by_layer.len() <= layer {
            self.by_layer.resize_with(layer + 1, BTreeSet::new);
            self.visits.resize(layer + 1, 0);
        }
        layer
    }

    fn used(&mut self, key: u32) {
        let layer = self.layer_of(key);
        if self.last_layer != Some(layer) {
            self.visits[layer] += 1;
            self.last_layer = Some(layer);
        }
        let n = self.uses.entry(key).or_insert(0);
        let old = *n;
        *n += 1;
        if self.resident.contains(&key) {
            let set = &mut self.by_layer[layer];
            set.remove(&(old, std::cmp::Reverse(key)));
            set.insert((old + 1, std::cmp::Reverse(key)));
        }
    }

    fn admit(&mut self, key: u32) {
        let layer = self.layer_of(key);
        if self.resident.insert(key) {
            let n = self.uses.get(&key).copied().unwrap_or(0);
            self.by_layer[layer].insert((n, std::cmp::Reverse(key)));
        }
    }

    /// Expected layer visits until an expert of `layer` with `uses` uses is next used.
    fn expected_next_use(&self, layer: usize, uses: u32) -> f64 {
        let cycle = self.by_layer.len().max(1);
        let current = self.last_layer.unwrap_or(layer);
        let d = match (layer + cycle - current % cycle) % cycle {
            0 => cycle,
            d => d,
        };
        let visits = self.visits.get(layer).copied().unwrap_or(0) as f64;
        // A small prior keeps an expert seen once (or only prefetched) from counting as certain
        // or as never coming back. Not clamped to 1: where one policy serves one layer (the
        // per-layer scope) no change of layer marks a visit, and the ratio must still rank
        // experts by their uses.
        let p = (uses as f64 + 0.1) / (visits + 1.0);
        d as f64 + cycle as f64 * (1.0 / p - 1.0)
    }
}

impl Policy for NextUse {
    fn on_hit(&mut self, key: u32) {
        self.used(key);
    }
    fn on_insert(&mut self, key: u32) {
        self.admit(key);
        self.used(key);
    }
    fn on_prefetch(&mut self, key: u32) {
        self.admit(key);
    }
    fn on_first_use(&mut self, key: u32) {
        self.used(key);
    }
    fn evict(&mut self) -> Option<u32> {
        // The furthest expected use; ties go to the larger key, so the choice never depends on
        // a container's order.
        let (layer, uses, key) = self
            .by_layer
            .iter()
            .enumerate()
            .filter_map(|(l, set)| set.first().map(|&(n, k)| (l, n, k.0)))
            .max_by(|a, b| {
                self.expected_next_use(a.0, a.1)
                    .total_cmp(&self.expected_next_use(b.0, b.1))
                    .then(a.2.cmp(&b.2))
            })?;
        self.by_layer[layer].remove(&(uses, std::cmp::Reverse(key)));
        self.resident.remove(&key);
        Some(key)
    }
    fn remove(&mut self, key: u32) {
        if self.resident.remove(&key) {
            let (layer, _) = super::pool::unkey(key);
            let n = self.uses.get(&key).copied().unwrap_or(0);
            self.by_layer[layer].remove(&(n, std::cmp::Reverse(key)));
        }
    }
}

/// LRU with a logical clock: O(log n) per operation, simple and exact.
#[derive(Default)]
pub struct Lru {
    clock: u64,
    last_use: HashMap<u32, u64>,
    order: BTreeSet<(u64, u32)>,
}

impl Lru {
    fn touch(&mut self, key: u32) {
        self.clock += 1;
        if let Some(old) = self.last_use.insert(key, self.clock) {
            self.order.remove(&(old, key));
        }
        self.order.insert((self.clock, key));
    }
}

impl Policy for Lru {
    fn on_hit(&mut self, key: u32) {
        self.touch(key);
    }
    fn on_insert(&mut self, key: u32) {
        self.touch(key);
    }
    fn evict(&mut self) -> Option<u32> {
        let first = *self.order.iter().next()?;
        self.order.remove(&first);
        self.last_use.remove(&first.1);
        Some(first.1)
    }
    fn remove(&mut self, key: u32) {
        if let Some(t) = self.last_use.remove(&key) {
            self.order.remove(&(t, key));
        }
    }
}

/// LFU: evicts the resident key with the fewest uses since it became resident; ties go to the
/// least recently used.
#[derive(Default)]
pub struct Lfu {
    clock: u64,
    state: HashMap<u32, (u64, u64)>,
    order: BTreeSet<(u64, u64, u32)>,
}

impl Lfu {
    fn bump(&mut self, key: u32, reset: bool) {
        self.clock += 1;
        let (count, t) = self.state.get(&key).copied().unwrap_or((0, 0));
        if self.state.contains_key(&key) {
            self.order.remove(&(count, t, key));
        }
        let count = if reset { 1 } else { count + 1 };
        self.state.insert(key, (count, self.clock));
        self.order.insert((count, self.clock, key));
    }
}

impl Policy for Lfu {
    fn on_hit(&mut self, key: u32) {
        self.bump(key, false);
    }
    fn on_insert(&mut self, key: u32) {
        self.bump(key, true);
    }
    fn on_first_use(&mut self, key: u32) {
        self.bump(key, true);
    }
    fn evict(&mut self) -> Option<u32> {
        let first = *self.order.iter().next()?;
        self.order.remove(&first);
        self.state.remove(&first.2);
        Some(first.2)
    }
    fn remove(&mut self, key: u32) {
        if let Some((c, t)) = self.state.remove(&key) {
            self.order.remove(&(c, t, key));
        }
    }
}

#[derive(Default)]
pub struct Fifo {
    queue: VecDeque<u32>,
    resident: HashSet<u32>,
}

impl Policy for Fifo {
    fn on_hit(&mut self, _key: u32) {}
    fn on_insert(&mut self, key: u32) {
        if self.resident.insert(key) {
            self.queue.push_back(key);
        }
    }
    fn evict(&mut self) -> Option<u32> {
        while let Some(k) = self.queue.pop_front() {
            if self.resident.remove(&k) {
                return Some(k);
            }
        }
        None
    }
    fn remove(&mut self, key: u32) {
        self.resident.remove(&key);
    }
}

/// S3-FIFO: new keys enter a small FIFO (10 % of capacity); a key evicted from it that was used
/// again moves to the main FIFO, otherwise it leaves and is remembered in a ghost FIFO; a key
/// inserted while in the ghost goes straight to main. Main reinserts keys used since their last
/// pass (frequency capped at 3) — a "second chance" that keeps the hot set.
pub struct S3Fifo {
    small_cap: usize,
    ghost_cap: usize,
    small: VecDeque<u32>,
    main: VecDeque<u32>,
    ghost: VecDeque<u32>,
    ghost_set: HashSet<u32>,
    freq: HashMap<u32, u8>,
    in_small: HashSet<u32>,
    /// Keys removed externally but possibly still queued (skipped lazily).
    resident: HashSet<u32>,
}

impl S3Fifo {
    pub fn new(capacity: usize) -> Self {
        S3Fifo {
            small_cap: (capacity / 10).max(1),
            ghost_cap: capacity.max(1),
            small: VecDeque::new(),
            main: VecDeque::new(),
            ghost: VecDeque::new(),
            ghost_set: HashSet::new(),
            freq: HashMap::new(),
            in_small: HashSet::new(),
            resident: HashSet::new(),
        }
    }

    fn remember_ghost(&mut self, key: u32) {
        if self.ghost_set.insert(key) {
            self.ghost.push_back(key);
        }
        while self.ghost.len() > self.ghost_cap {
            if let Some(k) = self.ghost.pop_front() {
                self.ghost_set.remove(&k);
            }
        }
    }

    fn evict_main(&mut self) -> Option<u32> {
        // Each pass lowers a frequency, so this ends within 4 rotations of the queue.
        while let Some(k) = self.main.pop_front() {
            if !self.resident.contains(&k) || self.in_small.contains(&k) {
                continue;
            }
            let f = self.freq.get(&k).copied().unwrap_or(0);
            if f > 0 {
                self.freq.insert(k, f - 1);
                self.main.push_back(k);
            } else {
                self.resident.remove(&k);
                self.freq.remove(&k);
                return Some(k);
            }
        }
        None
    }

    fn evict_small(&mut self) -> Option<u32> {
        while let Some(k) = self.small.pop_front() {
            if !self.in_small.remove(&k) || !self.resident.contains(&k) {
                continue;
            }
            if self.freq.get(&k).copied().unwrap_or(0) > 0 {
                // Used while on probation: promote (not an eviction).
                self.freq.insert(k, 0);
                self.main.push_back(k);
            } else {
                self.resident.remove(&k);
                self.freq.remove(&k);
                self.remember_ghost(k);
                return Some(k);
            }
        }
        None
    }
}

impl Policy for S3Fifo {
    fn on_hit(&mut self, key: u32) {
        let f = self.freq.entry(key).or_insert(0);
        *f = (*f + 1).min(3);
    }

    /// Still on probation with no use counted: as if it had been inserted now.
    fn on_first_use(&mut self, _key: u32) {}

    fn on_insert(&mut self, key: u32) {
        self.resident.insert(key);
        self.freq.insert(key, 0);
        if self.ghost_set.remove(&key) {
            self.ghost.retain(|&k| k != key);
            self.main.push_back(key);
        } else {
            self.in_small.insert(key);
            self.small.push_back(key);
        }
    }

    fn evict(&mut self) -> Option<u32> {
        loop {
            if self.resident.is_empty() {
                return None;
            }
            let small_len = self.in_small.len();
            let victim = if small_len >= self.small_cap || self.main.is_empty() {
                self.evict_small().or_else(|| self.evict_main())
            } else {
                self.evict_main().or_else(|| self.evict_small())
            };
            if victim.is_some() {
                return victim;
            }
        }
    }

    fn remove(&mut self, key: u32) {
        self.resident.remove(&key);
        self.in_small.remove(&key);
        self.freq.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a trace through a policy with a fixed capacity; returns hits.
    fn run(kind: PolicyKind, cap: usize, trace: &[u32]) -> usize {
        let mut p = kind.build(cap);
        let mut resident = HashSet::new();
        let mut hits = 0;
        for &k in trace {
            if resident.contains(&k) {
                hits += 1;
                p.on_hit(k);
                continue;
            }
            if resident.len() == cap {
                let v = p.evict().expect("something to evict");
                assert!(resident.remove(&v), "{kind:?} evicted non-resident {v}");
            }
            resident.insert(k);
            p.on_insert(k);
        }
        hits
    }

    #[test]
    fn lru_evicts_least_recent() {
        let mut p = Lru::default();
        for k in [1, 2, 3] {
            p.on_insert(k);
        }
        p.on_hit(1);
        assert_eq!(p.evict(), Some(2));
        assert_eq!(p.evict(), Some(3));
        assert_eq!(p.evict(), Some(1));
        assert_eq!(p.evict(), None);
    }

    #[test]
    fn lfu_evicts_least_frequent_then_oldest() {
        let mut p = Lfu::default();
        for k in [1, 2, 3] {
            p.on_insert(k);
        }
        p.on_hit(1);
        p.on_hit(1);
        p.on_hit(3);
        assert_eq!(p.evict(), Some(2));
        assert_eq!(p.evict(), Some(3));
    }

    #[test]
    fn fifo_ignores_hits() {
        let mut p = Fifo::default();
        for k in [1, 2, 3] {
            p.on_insert(k);
        }
        p.on_hit(1);
        assert_eq!(p.evict(), Some(1));
    }

    #[test]
    fn every_policy_only_evicts_residents_and_keeps_a_hot_key() {
        // A hot key (0) between scans of cold keys: every policy but FIFO should keep it.
        let mut trace = Vec::new();
        for i in 0..400u32 {
            trace.push(0);
            trace.push(1 + (i % 37));
        }
        for kind in PolicyKind::ALL {
            let hits = run(kind, 8, &trace);
            if kind != PolicyKind::Fifo {
                assert!(hits >= 390, "{kind:?} kept the hot key only {hits} times");
            }
        }
    }

    /// Of two experts used alike, the one whose layer the pass has just left comes back last.
    #[test]
    fn next_use_evicts_the_layer_just_served() {
        use crate::cache::pool::key;
        let (a, b) = (key(0, 1), key(1, 1));
        let mut p = PolicyKind::NextUse.build(2);
        p.on_insert(a);
        p.on_insert(b);
        p.on_hit(a);
        p.on_hit(b);
        assert_eq!(
            p.evict(),
            Some(b),
            "layer 1 was served last; layer 0 comes next"
        );
        let mut p = PolicyKind::NextUse.build(2);
        p.on_insert(b);
        p.on_insert(a);
        p.on_hit(b);
        p.on_hit(a);
        assert_eq!(p.evict(), Some(a), "now layer 0 was served last");
    }

    /// Within a layer the expert picked in fewer of its layer's visits goes, and what an expert
    /// was used for before an eviction still counts when it comes back.
    #[test]
    fn next_use_ranks_a_layer_by_uses_per_visit_and_remembers() {
        use crate::cache::pool::key;
        let (a, c, x) = (key(0, 1), key(0, 2), key(1, 1));
        let mut p = PolicyKind::NextUse.build(3);
        p.on_insert(a); // layer 0, visit 1
        p.on_insert(x); // layer 1
        p.on_hit(a); // layer 0, visit 2
        p.on_hit(x);
        p.on_insert(c); // layer 0, visit 3: c, not a
        p.on_hit(x);
        // a: 2 of 3 visits, c: 1 of 3; x comes after both in the cycle but is used every time.
        assert_eq!(p.evict(), Some(c));
        p.on_insert(c); // layer 0, visit 4
        p.on_hit(x);
        // c has now 2 uses in 4 visits against a's 2: the tie goes to the larger key, c.
        assert_eq!(p.evict(), Some(c));
        p.remove(a);
        assert_eq!(p.evict(), Some(x));
        assert_eq!(p.evict(), None);
    }

    #[test]
    fn s3fifo_resists_a_scan() {
        // Working set of 4 reused keys, interrupted by a one-time scan of 50 keys.
        let mut trace = Vec::new();
        for _ in 0..20 {
            trace.extend([1, 2, 3, 4]);
        }
        trace.extend(100..150);
        for _ in 0..20 {
            trace.extend([1, 2, 3, 4]);
        }
        let s3 = run(PolicyKind::S3fifo, 10, &trace);
        let lru = run(PolicyKind::Lru, 10, &trace);
        assert!(s3 > lru, "s3fifo {s3} hits vs lru {lru}");
    }

    #[test]
    fn a_prefetched_key_used_once_ranks_as_used_once() {
        // LFU: key 1 inserted and used twice; key 2 prefetched then used once (its first use);
        // key 3 inserted later, unused. 2 and 3 each count one use: the older, 2, goes first.
        let mut p = PolicyKind::Lfu.build(3);
        p.on_insert(1);
        p.on_hit(1);
        p.on_prefetch(2);
        p.on_first_use(2);
        p.on_insert(3);
        assert_eq!(p.evict(), Some(2));
        assert_eq!(p.evict(), Some(3));
        // Were the first use a hit, 2 would count two uses and outlive 3.
        let mut p = PolicyKind::Lfu.build(3);
        p.on_prefetch(2);
        p.on_hit(2);
        p.on_insert(3);
        assert_eq!(p.evict(), Some(3));
    }

    #[test]
    fn removal_is_respected() {
        for kind in PolicyKind::ALL {
            let mut p = kind.build(4);
            p.on_insert(1);
            p.on_insert(2);
            p.remove(1);
            assert_eq!(p.evict(), Some(2), "{kind:?}");
            assert_eq!(p.evict(), None, "{kind:?}");
        }
    }
}
