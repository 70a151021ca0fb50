//! The routing a worker reports: each token's experts per MoE layer (and the next-layer guesses,
//! when traced), collected during a forward pass and sent as one `routing` event per position.

use crate::model::ports::RoutingObserver;

/// Collects the current token's routing so it can be sent as one `routing` event.
pub(super) struct TraceObserver {
    pub moe_index: Vec<Option<usize>>,
    pub per_position: std::collections::BTreeMap<usize, Vec<Vec<u16>>>,
    /// Next-layer guesses per position, when they are traced.
    pub guesses: std::collections::BTreeMap<usize, Vec<Vec<u16>>>,
    pub layers: usize,
    pub enabled: bool,
    pub with_guesses: bool,
}

impl TraceObserver {
    fn record(
        map: &mut std::collections::BTreeMap<usize, Vec<Vec<u16>>>,
        layers: usize,
        i: usize,
        position: usize,
        experts: impl Iterator<Item = u16>,
    ) {
        let row = map
            .entry(position)
            .or_insert_with(|| vec![Vec::new(); layers]);
        row[i] = experts.collect();
    }
}

impl RoutingObserver for TraceObserver {
    fn on_routing(&mut self, layer: usize, position: usize, experts: &[u32], _w: &[f32]) {
        if !self.enabled {
            return;
        }
        if let Some(Some(i)) = self.moe_index.get(layer) {
            let it = experts.iter().map(|&e| e as u16);
            Self::record(&mut self.per_position, self.layers, *i, position, it);
        }
    }

    fn wants_guesses(&self) -> bool {
        self.enabled && self.with_guesses
    }

    fn on_guess(&mut self, layer: usize, position: usize, experts: &[usize]) {
        // With prefetch on, guesses come whether or not they were asked for; a trace keeps them.
        if !self.enabled {
            return;
        }
        if let Some(Some(i)) = self.moe_index.get(layer) {
            let it = experts.iter().map(|&e| e as u16);
            Self::record(&mut self.guesses, self.layers, *i, position, it);
        }
    }
}
