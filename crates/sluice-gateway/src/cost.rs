//! Prices per model and the cost of a call: USD per million tokens × tokens.

use std::collections::HashMap;

use crate::model::Usage;

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Price {
    pub fn cost(&self, usage: Usage) -> f64 {
        (usage.input_tokens as f64 * self.input_per_mtok + usage.output_tokens as f64 * self.output_per_mtok)
            / 1_000_000.0
    }
}

/// Prices by model name, as the targets name their models.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    prices: HashMap<String, Price>,
}

impl PriceTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, model: impl Into<String>, price: Price) {
        self.prices.insert(model.into(), price);
    }

    pub fn get(&self, model: &str) -> Option<Price> {
        self.prices.get(model).copied()
    }

    /// The cost in USD, or `None` when the model has no price (so a missing price is never
    /// mistaken for a free call).
    pub fn cost(&self, model: &str, usage: Usage) -> Option<f64> {
        self.get(model).map(|p| p.cost(usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_price_per_million_times_tokens() {
        let mut t = PriceTable::new();
        t.insert("gpt-4o", Price { input_per_mtok: 2.5, output_per_mtok: 10.0 });
        let usage = Usage { input_tokens: 1_000_000, output_tokens: 500_000 };
        assert_eq!(t.cost("gpt-4o", usage), Some(7.5));
        assert_eq!(t.cost("gpt-4o", Usage { input_tokens: 400, output_tokens: 0 }), Some(0.001));
        assert_eq!(t.cost("unknown", usage), None);
    }
}
