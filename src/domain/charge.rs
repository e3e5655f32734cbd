//! Charges: what is owed for a period, and the pure rule that decides which charges a growth of a
//! period total creates.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ids::{ChargeKey, ChargeKind, UserId};
use super::money::Money;
use super::period::PeriodKey;
use super::plan::Plan;
use super::rating::{MAX_BLOCKS_PER_EVENT, RatingError, TierLabel};

/// Where a charge is in its life.
///
/// ```text
///             collect ok            webhook / retry ok
/// Pending ──────────────► Succeeded ◄──────────────────┐
///    │  ▲                                              │
///    │  └──── dunning retry (next round) ──── Failed ──┤
///    ├────────────── declined ─────────────────► │     │
///    └──────── authentication needed ────► RequiresAction
/// ```
/// `Succeeded` is final. A charge whose outcome is unknown stays `Pending` and is resumed with the
/// same idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChargeStatus {
    /// Recorded, not yet known to be paid: being collected, or waiting to be.
    Pending,
    /// Paid.
    Succeeded,
    /// Declined or canceled; retried on the dunning schedule.
    Failed,
    /// The customer must authenticate the payment (3-D Secure) before it can succeed.
    RequiresAction,
}

impl ChargeStatus {
    /// The status as stored and as the original product's API shows it (`succeeded`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ChargeStatus::Pending => "pending",
            ChargeStatus::Succeeded => "succeeded",
            ChargeStatus::Failed => "failed",
            ChargeStatus::RequiresAction => "requires_action",
        }
    }

    /// Whether a charge may move from `self` to `to`.
    ///
    /// Allowed: `Pending` to anything else (and to itself, to record a gateway reference);
    /// `Failed` and `RequiresAction` to `Pending` (a new round), to `Succeeded` (paid out of band,
    /// such as after authentication) and to each other. Nothing leaves `Succeeded`.
    pub const fn can_become(self, to: ChargeStatus) -> bool {
        use ChargeStatus::*;
        matches!(
            (self, to),
            (Pending, _) | (Failed | RequiresAction, Pending | Succeeded | Failed | RequiresAction)
        )
    }

    /// Whether the charge is unpaid and needs the customer or the dunning schedule: `Failed` or
    /// `RequiresAction`. An account with such a charge is past due.
    pub const fn is_unpaid(self) -> bool {
        matches!(self, ChargeStatus::Failed | ChargeStatus::RequiresAction)
    }
}

impl fmt::Display for ChargeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The text is not a charge status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown charge status {0:?}")]
pub struct UnknownChargeStatus(pub String);

impl FromStr for ChargeStatus {
    type Err = UnknownChargeStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(ChargeStatus::Pending),
            "succeeded" => Ok(ChargeStatus::Succeeded),
            "failed" => Ok(ChargeStatus::Failed),
            "requires_action" => Ok(ChargeStatus::RequiresAction),
            other => Err(UnknownChargeStatus(other.chars().take(32).collect())),
        }
    }
}

/// Who collects the fixed fee.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FeeCollection {
    /// The library charges it through the gateway when the period opens: at the user's first
    /// usage in the period, or earlier when the host opens the period.
    #[default]
    Library,
    /// A gateway subscription collects it (the original product's create-subscription); the library records
    /// it when the gateway reports the period's invoice paid.
    Subscription,
}

/// A charge to create: everything but its identity and life-cycle fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCharge {
    /// The deterministic key.
    pub key: ChargeKey,
    /// The user charged.
    pub user_id: UserId,
    /// The period charged.
    pub period: PeriodKey,
    /// What for.
    pub kind: ChargeKind,
    /// The block index (0 for the fixed fee).
    pub block: u64,
    /// The tier label: the block's tier, or the allowance's tier for the fixed fee.
    pub billing_tier: TierLabel,
    /// How much.
    pub amount: Money,
    /// The usage event that created it, if any.
    pub consumption_id: Option<Uuid>,
}

impl NewCharge {
    /// The period's fixed-fee charge under `plan`.
    pub fn fixed_fee(plan: &Plan, user: &UserId, period: PeriodKey, consumption_id: Option<Uuid>) -> NewCharge {
        NewCharge {
            key: ChargeKey::new(user, period, ChargeKind::FixedFee, 0),
            user_id: user.clone(),
            period,
            kind: ChargeKind::FixedFee,
            block: 0,
            billing_tier: plan.tier_at(0).label(),
            amount: plan.fixed_fee(),
            consumption_id,
        }
    }

    /// The charge for block `block` (1-based) of `period` under `plan`.
    pub fn block(plan: &Plan, user: &UserId, period: PeriodKey, block: u64, consumption_id: Option<Uuid>) -> NewCharge {
        NewCharge {
            key: ChargeKey::new(user, period, ChargeKind::Block, block),
            user_id: user.clone(),
            period,
            kind: ChargeKind::Block,
            block,
            billing_tier: plan.tier_at(block).label(),
            amount: plan.block_price(),
            consumption_id,
        }
    }

    /// Makes the stored charge, with a fresh id, at round 0 and no attempts.
    pub fn into_charge(self, id: Uuid, status: ChargeStatus, now: DateTime<Utc>) -> Charge {
        Charge {
            id,
            key: self.key,
            user_id: self.user_id,
            period: self.period,
            kind: self.kind,
            block: self.block,
            billing_tier: self.billing_tier,
            amount: self.amount,
            status,
            round: 0,
            attempts: 0,
            consumption_id: self.consumption_id,
            payment_id: None,
            failure_code: None,
            failure_message: None,
            next_retry_at: None,
            lease_until: None,
            created_at: now,
            updated_at: now,
        }
    }
}

/// The charges a period total's growth from `before` to `after` creates, in block order: the
/// fixed fee when the period opens (`before == 0`) and the library collects it, then one charge
/// per block started.
///
/// This is the one rule every store applies inside its atomic record operation; stores hold no
/// pricing logic of their own.
///
/// # Errors
/// [`RatingError`] when a total is out of range, `after < before`, or the growth starts more than
/// [`MAX_BLOCKS_PER_EVENT`] blocks.
///
/// # Example
/// ```
/// use token_billing::{FeeCollection, Plan, UserId, charges_for_growth};
///
/// let plan = Plan::default();
/// let user = UserId::new("test-user-id")?;
/// let charges = charges_for_growth(&plan, FeeCollection::Library, &user, "2026-11".parse()?, 0, 10_000_000, None)?;
/// let labels: Vec<_> = charges.iter().map(|c| (c.billing_tier.as_str(), c.amount.minor_units())).collect();
/// assert_eq!(labels, [("0-8M", 40000), ("8M-16M", 10000)]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn charges_for_growth(
    plan: &Plan,
    fee: FeeCollection,
    user: &UserId,
    period: PeriodKey,
    before: u64,
    after: u64,
    consumption_id: Option<Uuid>,
) -> Result<Vec<NewCharge>, RatingError> {
    let blocks = plan.blocks_crossed(before, after)?;
    if blocks.len() > MAX_BLOCKS_PER_EVENT {
        return Err(RatingError::TooManyBlocks { blocks: blocks.len() });
    }
    let opens = before == 0 && after > 0 && fee == FeeCollection::Library;
    let capacity = usize::try_from(blocks.len())
        .unwrap_or(usize::MAX)
        .saturating_add(usize::from(opens));
    let mut charges = Vec::with_capacity(capacity.min(1024));
    if opens {
        charges.push(NewCharge::fixed_fee(plan, user, period, consumption_id));
    }
    charges.extend(
        blocks
            .into_iter()
            .map(|block| NewCharge::block(plan, user, period, block, consumption_id)),
    );
    Ok(charges)
}

/// A charge as stored: the original product's `token_billing_charges` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// The charge's id (the original product's `id`).
    pub id: Uuid,
    /// The deterministic key, unique per charge.
    pub key: ChargeKey,
    /// The user charged.
    pub user_id: UserId,
    /// The period charged.
    pub period: PeriodKey,
    /// What for.
    pub kind: ChargeKind,
    /// The block index, 0 for the fixed fee.
    pub block: u64,
    /// The tier label (the original product's `billing_tier`).
    pub billing_tier: TierLabel,
    /// How much (the original product's `amount_charged`, in minor units at the edges).
    pub amount: Money,
    /// Where it is in its life.
    pub status: ChargeStatus,
    /// The collection round: 0 for the first, one more for each dunning retry. Each round has its
    /// own idempotency key ([`ChargeKey::idempotency_key`]).
    pub round: u32,
    /// How many times collection was started, over all rounds.
    pub attempts: u32,
    /// The usage event that created it.
    pub consumption_id: Option<Uuid>,
    /// The gateway's payment reference (`pi_...`), once known.
    pub payment_id: Option<String>,
    /// The decline code of the last failure (`card_declined`, `insufficient_funds`).
    pub failure_code: Option<String>,
    /// The gateway's message for the last failure.
    pub failure_message: Option<String>,
    /// When a failed charge is next retried; `None` once the schedule is exhausted.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// Until when a collector holds the charge; others leave it alone until then.
    pub lease_until: Option<DateTime<Utc>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl Charge {
    /// The idempotency key of the charge's current round.
    pub fn idempotency_key(&self) -> String {
        self.key.idempotency_key(self.round)
    }

    /// Whether a collector other than the lease holder may take it at `now`.
    pub fn is_claimable(&self, now: DateTime<Utc>) -> bool {
        self.status == ChargeStatus::Pending && self.lease_until.is_none_or(|until| until <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        use ChargeStatus::*;
        assert!(Pending.can_become(Succeeded));
        assert!(Pending.can_become(Pending));
        assert!(Failed.can_become(Pending));
        assert!(RequiresAction.can_become(Succeeded));
        for to in [Pending, Failed, RequiresAction, Succeeded] {
            assert!(!Succeeded.can_become(to));
        }
        for s in [Pending, Succeeded, Failed, RequiresAction] {
            assert_eq!(s.as_str().parse::<ChargeStatus>(), Ok(s));
        }
    }

    #[test]
    fn subscription_plans_create_no_fee_charge() {
        let plan = Plan::default();
        let user = UserId::new("u").expect("valid");
        let period = PeriodKey::new(2026, 11).expect("valid");
        let charges =
            charges_for_growth(&plan, FeeCollection::Subscription, &user, period, 0, 8_000_001, None).expect("ok");
        assert_eq!(charges.len(), 1);
        assert_eq!(charges[0].kind, ChargeKind::Block);
        let none = charges_for_growth(&plan, FeeCollection::Library, &user, period, 5, 6, None).expect("ok");
        assert!(none.is_empty());
    }
}
