//! Threshold alerts: which points of a period's usage a host wants to hear about
//! ([`AlertPolicy`]), what an alert says ([`AlertKind`]), and which an event crosses when it
//! moves the period total from `before` to `after` ([`AlertPolicy::crossed`]). Pure: the stores
//! call it inside the atomic step that records the event, so that each crossing creates its
//! alert exactly once.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::limits::Ceiling;
use super::plan::Plan;
use super::rating::MAX_BLOCKS_PER_EVENT;

/// The thresholds that create an alert when a period's usage crosses them. None by default.
///
/// # Example
/// ```
/// use token_billing::AlertPolicy;
///
/// // 80% and 100% of the allowance, every block started, 90% of the cap and the cap itself,
/// // and the payment gate closing.
/// let policy = AlertPolicy::standard();
/// assert_eq!(policy.allowance_percent, [80, 100]);
/// assert!(AlertPolicy::default().is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertPolicy {
    /// Shares of the allowance, in percent (1 to 100): an alert when the total reaches each.
    pub allowance_percent: Vec<u8>,
    /// An alert for every block started.
    pub blocks: bool,
    /// Shares of the cap (the lower of the spend cap's tokens and the token cap), in percent
    /// (1 to 99): an alert when the total reaches each.
    pub cap_percent: Vec<u8>,
    /// An alert when the total reaches the cap.
    pub cap_reached: bool,
    /// An alert when the payment gate first refuses usage in a period.
    pub payment_gate: bool,
}

impl AlertPolicy {
    /// No alert.
    pub fn none() -> AlertPolicy {
        AlertPolicy::default()
    }

    /// 80% and 100% of the allowance, every block, 90% of the cap, the cap, the payment gate.
    pub fn standard() -> AlertPolicy {
        AlertPolicy {
            allowance_percent: vec![80, 100],
            blocks: true,
            cap_percent: vec![90],
            cap_reached: true,
            payment_gate: true,
        }
    }

    /// Whether no alert is asked for.
    pub fn is_none(&self) -> bool {
        self.allowance_percent.is_empty()
            && !self.blocks
            && self.cap_percent.is_empty()
            && !self.cap_reached
            && !self.payment_gate
    }

    /// The totals whose reaching creates an alert other than a block's, with the alert: the
    /// allowance's shares, the cap's shares and the cap. Shares out of range are ignored.
    pub fn points(&self, plan: &Plan, ceiling: &Ceiling) -> Vec<(u64, AlertKind)> {
        let share = |of: u64, percent: u8| {
            // ceil(of * percent / 100), exactly: at most of, which is a u64.
            let at = (u128::from(of) * u128::from(percent)).div_ceil(100);
            u64::try_from(at).unwrap_or(of).max(1)
        };
        let mut points = Vec::new();
        for &percent in &self.allowance_percent {
            if (1..=100).contains(&percent) && plan.included_tokens() > 0 {
                points.push((share(plan.included_tokens(), percent), AlertKind::Allowance { percent }));
            }
        }
        if let Some(cap) = ceiling.cap_tokens() {
            for &percent in &self.cap_percent {
                if (1..100).contains(&percent) {
                    points.push((share(cap, percent), AlertKind::Cap { percent }));
                }
            }
            if self.cap_reached {
                points.push((cap.max(1), AlertKind::CapReached));
            }
        }
        // A share named twice is one alert, raised once.
        points.sort_unstable();
        points.dedup();
        points
    }

    /// The alerts an event crosses when it moves a period rated by `plan` under `ceiling` from
    /// `before` to `after` tokens: each point with `before < point <= after`, and each block
    /// started (at most [`MAX_BLOCKS_PER_EVENT`], the most an event may start).
    ///
    /// # Properties
    /// For totals `a <= b <= c`, the alerts crossed from `a` to `c` are those crossed from `a` to
    /// `b` and from `b` to `c`, none in both: splitting usage into events never doubles or loses
    /// an alert.
    ///
    /// # Example
    /// ```
    /// use token_billing::{AlertKind, AlertPolicy, Ceiling, Plan};
    ///
    /// let plan = Plan::default(); // 8M included
    /// let crossed = AlertPolicy::standard().crossed(&plan, &Ceiling::default(), 6_000_000, 9_000_000);
    /// assert_eq!(
    ///     crossed,
    ///     [AlertKind::Allowance { percent: 80 }, AlertKind::Allowance { percent: 100 }, AlertKind::Block { block: 1 }]
    /// );
    /// ```
    pub fn crossed(&self, plan: &Plan, ceiling: &Ceiling, before: u64, after: u64) -> Vec<AlertKind> {
        let mut crossed: Vec<AlertKind> = self
            .points(plan, ceiling)
            .into_iter()
            .filter(|(at, _)| before < *at && *at <= after)
            .map(|(_, kind)| kind)
            .collect();
        if self.blocks && after > before {
            let first = plan.blocks_owed(before) + 1;
            // An event starting more blocks is refused ([`RatingError::TooManyBlocks`]), so no
            // more can be crossed: the bound keeps a refused event from costing memory here.
            let last = plan
                .blocks_owed(after)
                .min(first.saturating_add(MAX_BLOCKS_PER_EVENT - 1));
            crossed.extend((first..=last).map(|block| AlertKind::Block { block }));
        }
        crossed
    }
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AlertKind {
    /// The period's total reached `percent` of the allowance.
    Allowance {
        /// The share, in percent.
        percent: u8,
    },
    /// A block was started.
    Block {
        /// The block's index (1 for the first beyond the allowance).
        block: u64,
    },
    /// The total reached `percent` of the cap.
    Cap {
        /// The share, in percent.
        percent: u8,
    },
    /// The total reached the cap.
    CapReached,
    /// The payment gate refused usage: a charge is unpaid past its grace.
    PaymentGate,
}

impl AlertKind {
    /// The alert's key, unique in its user's period: `allowance:80`, `block:3`, `cap:90`,
    /// `cap_reached`, `payment_gate`.
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlertKind::Allowance { percent } => write!(f, "allowance:{percent}"),
            AlertKind::Block { block } => write!(f, "block:{block}"),
            AlertKind::Cap { percent } => write!(f, "cap:{percent}"),
            AlertKind::CapReached => f.write_str("cap_reached"),
            AlertKind::PaymentGate => f.write_str("payment_gate"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A share named twice in a policy is one threshold: an event crossing it raises one alert.
    #[test]
    fn a_share_named_twice_is_crossed_once() {
        let policy = AlertPolicy {
            allowance_percent: vec![50, 50],
            blocks: false,
            cap_percent: vec![33, 33],
            cap_reached: false,
            payment_gate: false,
        };
        let ceiling = Ceiling {
            token_cap: Some(30_000_000),
            ..Ceiling::default()
        };
        let crossed = policy.crossed(&Plan::default(), &ceiling, 0, 12_000_000);
        assert_eq!(
            crossed,
            [AlertKind::Allowance { percent: 50 }, AlertKind::Cap { percent: 33 }]
        );
    }
}
