//! Precision tiers: a route may name another route that serves the callers who ask for
//! precision (a larger, slower or dearer model), so callers name one route for both.

use std::collections::HashMap;

/// Each route's precision route. A route without one is its own precision tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrecisionTiers {
    tiers: HashMap<String, String>,
}

impl PrecisionTiers {
    /// Callers of `route` asking for precision are served by `precision`.
    pub fn insert(&mut self, route: impl Into<String>, precision: impl Into<String>) {
        self.tiers.insert(route.into(), precision.into());
    }

    /// `route`'s precision route, if it names one.
    pub fn get(&self, route: &str) -> Option<&str> {
        self.tiers.get(route).map(String::as_str)
    }

    /// The route that serves a call to `route`. One step only: a precision route's own
    /// precision tier is not followed, so tiers cannot loop.
    pub fn resolve<'a>(&'a self, route: &'a str, precision: bool) -> &'a str {
        match self.get(route) {
            Some(tier) if precision => tier,
            _ => route,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_callers_asking_for_precision_move_and_only_one_step() {
        let mut tiers = PrecisionTiers::default();
        tiers.insert("fast", "precise");
        tiers.insert("precise", "fast");
        let cases =
            [("fast", false, "fast"), ("fast", true, "precise"), ("precise", true, "fast"), ("other", true, "other")];
        for (route, precision, expect) in cases {
            assert_eq!(tiers.resolve(route, precision), expect, "{route} precision={precision}");
        }
    }
}
