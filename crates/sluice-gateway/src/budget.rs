//! Budgets: spending limits in USD per tenant or per API key over a period (a UTC day, a UTC
//! month, or all time). A soft limit raises an alert once per period; a hard limit refuses calls.
//!
//! [`Budgets`] keeps what each budget has spent in its current period, plus what calls in flight
//! have reserved, so that concurrent calls cannot together run past a hard limit by more than
//! their estimates were wrong. The spend of a period is loaded from the usage ledger the first
//! time it is needed ([`Budgets::missing`] / [`Budgets::load`]): a restart forgets nothing.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use serde::Deserialize;

/// The period a budget counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// A UTC calendar day.
    Day,
    /// A UTC calendar month.
    Month,
    /// Since the ledger began.
    Total,
}

impl Period {
    /// When the period containing `now_ms` began (ms since the epoch).
    pub fn start_ms(self, now_ms: i64) -> i64 {
        const DAY: i64 = 86_400_000;
        match self {
            Self::Total => 0,
            Self::Day => now_ms.div_euclid(DAY) * DAY,
            Self::Month => {
                let (y, m, _) = civil_from_days(now_ms.div_euclid(DAY));
                days_from_civil(y, m, 1) * DAY
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
            Self::Total => "total",
        }
    }
}

// Proleptic Gregorian calendar conversions (H. Hinnant's algorithms).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One budget of the config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub name: String,
    /// The tenant it applies to.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Only calls made with this API key; without one, every call of the tenant.
    #[serde(default)]
    pub key: Option<String>,
    pub period: Period,
    /// Alert (once per period) when the spend reaches this many USD.
    #[serde(default)]
    pub soft_usd: Option<f64>,
    /// Refuse calls that would take the spend past this many USD.
    #[serde(default)]
    pub hard_usd: Option<f64>,
}

fn default_tenant() -> String {
    "default".to_string()
}

/// A call refused because it would take a budget past its hard limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Exceeded {
    pub budget: String,
    pub tenant: String,
    pub key: Option<String>,
    pub period: Period,
    pub limit_usd: f64,
    pub spent_usd: f64,
    pub estimate_usd: f64,
}

impl Exceeded {
    /// The error details callers show: the budget, its limit and the spend.
    pub fn details(&self) -> serde_json::Value {
        serde_json::json!({"budget": self.budget, "limit_usd": self.limit_usd, "spent_usd": self.spent_usd})
    }
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = match &self.key {
            Some(key) => format!("API key `{key}` of tenant `{}`", self.tenant),
            None => format!("tenant `{}`", self.tenant),
        };
        write!(
            f,
            "budget `{}` ({scope}, per {}) is exhausted: ${:.6} spent (plus ${:.6} in flight and estimated for this call) of a ${:.6} hard limit",
            self.budget,
            self.period.as_str(),
            self.spent_usd,
            self.estimate_usd,
            self.limit_usd
        )
    }
}

impl std::error::Error for Exceeded {}

/// A budget that reached a limit in a period.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub budget: String,
    pub tenant: String,
    pub period_start_ms: i64,
    /// `soft` or `hard`.
    pub level: &'static str,
    pub limit_usd: f64,
    pub spent_usd: f64,
}

/// What a budget must know before it can admit a call: its spend since `since_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    pub budget: String,
    pub tenant: String,
    pub key: Option<String>,
    pub since_ms: i64,
}

/// Money set aside for one admitted call; give it back with [`Budgets::settle`].
#[derive(Debug, Default)]
#[must_use = "a reservation must be settled"]
pub struct Reservation {
    entries: Vec<(usize, i64)>,
    amount: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Spend {
    spent: f64,
    reserved: f64,
    soft_alerted: bool,
    hard_alerted: bool,
}

#[derive(Debug, Default)]
pub struct Budgets {
    list: Vec<BudgetConfig>,
    /// By (index in `list`, period start).
    state: Mutex<HashMap<(usize, i64), Spend>>,
}

impl Budgets {
    pub fn new(list: Vec<BudgetConfig>) -> Self {
        Self { list, state: Mutex::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn list(&self) -> &[BudgetConfig] {
        &self.list
    }

    fn applicable<'a>(
        &'a self,
        tenant: &'a str,
        key: Option<&'a str>,
    ) -> impl Iterator<Item = (usize, &'a BudgetConfig)> {
        self.list
            .iter()
            .enumerate()
            .filter(move |(_, b)| b.tenant == tenant && (b.key.is_none() || b.key.as_deref() == key))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, i64), Spend>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The budgets of this call whose current period's spend is not known yet.
    pub fn missing(&self, tenant: &str, key: Option<&str>, now_ms: i64) -> Vec<Load> {
        let state = self.state();
        self.applicable(tenant, key)
            .filter(|(i, b)| !state.contains_key(&(*i, b.period.start_ms(now_ms))))
            .map(|(_, b)| Load {
                budget: b.name.clone(),
                tenant: b.tenant.clone(),
                key: b.key.clone(),
                since_ms: b.period.start_ms(now_ms),
            })
            .collect()
    }

    /// Sets the spend of a budget's period, read from the ledger; kept if already known.
    pub fn load(&self, load: &Load, spent_usd: f64) {
        let Some(i) = self.list.iter().position(|b| b.name == load.budget) else { return };
        let soft = self.list[i].soft_usd.is_some_and(|s| spent_usd >= s);
        let hard = self.list[i].hard_usd.is_some_and(|h| spent_usd >= h);
        self.state().entry((i, load.since_ms)).or_insert(Spend {
            spent: spent_usd,
            reserved: 0.0,
            soft_alerted: soft,
            hard_alerted: hard,
        });
    }

    /// Admits a call estimated to cost `estimate_usd` if no hard limit of its tenant's and key's
    /// budgets would be passed, and reserves the estimate in each of them; otherwise names the
    /// first budget that refuses. Budgets whose spend is not loaded count from zero.
    pub fn reserve(
        &self,
        tenant: &str,
        key: Option<&str>,
        estimate_usd: f64,
        now_ms: i64,
    ) -> Result<Reservation, Exceeded> {
        let mut state = self.state();
        let mut entries = Vec::new();
        for (i, b) in self.applicable(tenant, key) {
            let at = (i, b.period.start_ms(now_ms));
            let s = state.get(&at).copied().unwrap_or_default();
            if let Some(hard) = b.hard_usd {
                // At the limit nothing more is admitted, even a call estimated at zero.
                if s.spent >= hard || s.spent + s.reserved + estimate_usd > hard {
                    return Err(Exceeded {
                        budget: b.name.clone(),
                        tenant: b.tenant.clone(),
                        key: b.key.clone(),
                        period: b.period,
                        limit_usd: hard,
                        spent_usd: s.spent,
                        estimate_usd: s.reserved + estimate_usd,
                    });
                }
            }
            entries.push(at);
        }
        for at in &entries {
            state.entry(*at).or_default().reserved += estimate_usd;
        }
        Ok(Reservation { entries, amount: estimate_usd })
    }

    /// Replaces a reservation by what the call cost; returns the limits this spend reached for
    /// the first time in their period.
    pub fn settle(&self, reservation: Reservation, cost_usd: f64) -> Vec<Alert> {
        let mut state = self.state();
        let mut alerts = Vec::new();
        for at in reservation.entries {
            let b = &self.list[at.0];
            let s = state.entry(at).or_default();
            s.reserved = (s.reserved - reservation.amount).max(0.0);
            s.spent += cost_usd;
            let alert = |level: &'static str, limit: f64| Alert {
                budget: b.name.clone(),
                tenant: b.tenant.clone(),
                period_start_ms: at.1,
                level,
                limit_usd: limit,
                spent_usd: s.spent,
            };
            if let Some(soft) = b.soft_usd.filter(|soft| !s.soft_alerted && s.spent >= *soft) {
                alerts.push(alert("soft", soft));
                s.soft_alerted = true;
            }
            if let Some(hard) = b.hard_usd.filter(|hard| !s.hard_alerted && s.spent >= *hard) {
                alerts.push(alert("hard", hard));
                s.hard_alerted = true;
            }
        }
        alerts
    }

    /// What each budget has spent and reserved in its current period, for `GET /v1/budgets`.
    pub fn snapshot(&self, tenant: &str, now_ms: i64) -> Vec<(BudgetConfig, i64, Option<f64>, f64)> {
        let state = self.state();
        self.list
            .iter()
            .enumerate()
            .filter(|(_, b)| b.tenant == tenant)
            .map(|(i, b)| {
                let start = b.period.start_ms(now_ms);
                let s = state.get(&(i, start));
                (b.clone(), start, s.map(|s| s.spent), s.map_or(0.0, |s| s.reserved))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(name: &str, key: Option<&str>, soft: Option<f64>, hard: Option<f64>) -> BudgetConfig {
        BudgetConfig {
            name: name.into(),
            tenant: "default".into(),
            key: key.map(str::to_string),
            period: Period::Month,
            soft_usd: soft,
            hard_usd: hard,
        }
    }

    #[test]
    fn periods_start_at_utc_midnight_and_the_first_of_the_month() {
        // 2026-11-23T15:04:05Z
        let now = 1_795_446_245_000;
        assert_eq!(Period::Day.start_ms(now), 1_795_392_000_000); // 2026-11-23T00:00Z
        assert_eq!(Period::Month.start_ms(now), 1_793_491_200_000); // 2026-11-01T00:00Z
        assert_eq!(Period::Total.start_ms(now), 0);
        // 2024-02-29T23:59:59Z is in February of a leap year.
        assert_eq!(Period::Month.start_ms(1_709_251_199_000), 1_706_745_600_000); // 2024-02-01
        assert_eq!(Period::Month.start_ms(1_706_745_600_000), 1_706_745_600_000);
    }

    #[test]
    fn the_stricter_of_key_and_tenant_budgets_refuses_and_alerts_come_once() {
        let b = Budgets::new(vec![
            budget("tenant", None, Some(0.5), Some(1.0)),
            budget("key-a", Some("a"), None, Some(0.3)),
        ]);
        let now = 0;
        // Key a: its own $0.30 cap is the stricter.
        let r = b.reserve("default", Some("a"), 0.2, now).unwrap_or_else(|e| panic!("{e}"));
        assert!(b.settle(r, 0.2).is_empty());
        let e = b.reserve("default", Some("a"), 0.2, now).err().map(|e| e.budget);
        assert_eq!(e.as_deref(), Some("key-a"));
        // Key b is held only by the tenant's $1.00, which already counts key a's $0.20.
        let r = b.reserve("default", Some("b"), 0.4, now).unwrap_or_else(|e| panic!("{e}"));
        let alerts = b.settle(r, 0.4);
        assert_eq!(alerts.iter().map(|a| (a.budget.as_str(), a.level)).collect::<Vec<_>>(), [("tenant", "soft")]);
        let r = b.reserve("default", Some("b"), 0.4, now).unwrap_or_else(|e| panic!("{e}"));
        let alerts = b.settle(r, 0.4);
        // The soft alert is raised once per period; reaching the cap raises the hard one.
        assert_eq!(alerts.iter().map(|a| (a.budget.as_str(), a.level)).collect::<Vec<_>>(), [("tenant", "hard")]);
        let e = b.reserve("default", Some("b"), 0.4, now).err();
        assert_eq!(e.as_ref().map(|e| e.budget.as_str()), Some("tenant"));
        assert!(e.is_some_and(|e| e.to_string().contains("budget `tenant` (tenant `default`, per month)")));
        // Another tenant is not affected.
        assert!(b.reserve("other", Some("a"), 5.0, now).is_ok());
    }

    #[test]
    fn reservations_in_flight_count_and_are_released() {
        let b = Budgets::new(vec![budget("cap", None, None, Some(1.0))]);
        let r1 = b.reserve("default", None, 0.6, 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(b.reserve("default", None, 0.6, 0).is_err(), "two calls in flight may not pass the cap together");
        let _ = b.settle(r1, 0.1);
        assert!(b.reserve("default", None, 0.6, 0).is_ok());
    }

    #[test]
    fn spend_loaded_from_the_ledger_counts_and_a_spent_budget_admits_nothing() {
        let b = Budgets::new(vec![budget("cap", None, Some(0.5), Some(1.0))]);
        let missing = b.missing("default", None, 0);
        assert_eq!(missing.len(), 1);
        b.load(&missing[0], 1.0);
        assert!(b.missing("default", None, 0).is_empty());
        assert!(b.reserve("default", None, 0.0, 0).is_err());
        // A new month starts from nothing.
        let next_month = 40 * 86_400_000;
        assert_eq!(b.missing("default", None, next_month).len(), 1);
    }
}
