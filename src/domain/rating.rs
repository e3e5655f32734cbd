//! Rating: which tier a period total is in, and which blocks a growth of the total starts.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::plan::Plan;

/// The largest period total the library accepts: `i64::MAX`, so that every total fits a SQL
/// `BIGINT`.
pub const MAX_TOKENS: u64 = i64::MAX as u64;

/// The most blocks one usage event may start, and so the most charges it may create: a bound on
/// the work and memory of one record operation. With the original product's 8M-token blocks it is 80 billion
/// tokens in one event.
pub const MAX_BLOCKS_PER_EVENT: u64 = 10_000;

/// Why a total could not be rated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RatingError {
    /// A total above [`MAX_TOKENS`].
    #[error("{tokens} tokens is above the maximum of {MAX_TOKENS}")]
    TokensOutOfRange {
        /// The total.
        tokens: u64,
    },
    /// One event would start more blocks than [`MAX_BLOCKS_PER_EVENT`]: the plan's blocks are
    /// tiny for the usage reported, and recording it would create that many charges at once.
    #[error("one event would start {blocks} blocks, more than {MAX_BLOCKS_PER_EVENT}")]
    TooManyBlocks {
        /// The blocks the event would start.
        blocks: u64,
    },
    /// Totals only grow.
    #[error("a period total cannot go from {before} down to {after}")]
    TotalDecreased {
        /// The total before.
        before: u64,
        /// The total after.
        after: u64,
    },
}

/// A billing tier: index 0 holds the totals the fixed fee covers (`0..=included`), index `k >= 1`
/// the totals in the `k`-th block (`lower < total <= upper`).
///
/// Its label, from [`Display`](fmt::Display) or [`Tier::label`], is the stable string stored with
/// charges: `0-8M`, `8M-16M`, and exact compact forms for sizes that are not whole millions
/// (`1.5M-3M`, `750K-1.5M`, `999.999K-1.999999M`, `0-500`).
///
/// # Example
/// ```
/// use token_billing::{Plan, calculate_billing_tier};
///
/// let plan = Plan::default();
/// let tier = calculate_billing_tier(&plan, 10_000_000)?;
/// assert_eq!((tier.index(), tier.lower(), tier.upper()), (1, 8_000_000, 16_000_000));
/// assert_eq!(tier.label(), "8M-16M");
/// assert!(tier.contains(16_000_000) && !tier.contains(8_000_000));
/// # Ok::<(), token_billing::RatingError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tier {
    index: u64,
    lower: u64,
    upper: u64,
}

impl Tier {
    pub(crate) const fn new(index: u64, lower: u64, upper: u64) -> Tier {
        Tier { index, lower, upper }
    }

    /// 0 for the allowance, `k` for the `k`-th block.
    pub const fn index(&self) -> u64 {
        self.index
    }

    /// The tier's lower bound: exclusive for blocks, and 0 for the allowance.
    pub const fn lower(&self) -> u64 {
        self.lower
    }

    /// The tier's inclusive upper bound.
    pub const fn upper(&self) -> u64 {
        self.upper
    }

    /// Whether a period total falls in this tier.
    pub const fn contains(&self, total: u64) -> bool {
        if self.index == 0 {
            total <= self.upper
        } else {
            self.lower < total && total <= self.upper
        }
    }

    /// The stable label, as stored with charges (`8M-16M`).
    pub fn label(&self) -> TierLabel {
        // Nearly every event of a thread lands in the tier of the one before: the label is
        // remembered rather than formatted again (it depends on the bounds alone), and shared.
        thread_local! {
            static LAST: std::cell::RefCell<Option<(u64, u64, TierLabel)>> = const { std::cell::RefCell::new(None) };
        }
        LAST.with(|last| {
            let mut last = last.borrow_mut();
            match &*last {
                Some((lower, upper, label)) if (*lower, *upper) == (self.lower, self.upper) => label.clone(),
                _ => {
                    let label = TierLabel::from(self.to_string());
                    *last = Some((self.lower, self.upper, label.clone()));
                    label
                }
            }
        })
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        super::padded(f, |out| {
            write_compact(out, self.lower)?;
            out.write_char('-')?;
            write_compact(out, self.upper)
        })
    }
}

/// A tier's label (`8M-16M`: the original product's `billing_tier`), as charges, outcomes and summaries carry
/// it.
///
/// Cheap to clone: the text is shared, never copied, so the label every charge and outcome of a
/// tier carries costs no allocation of its own. It reads as a `&str` ([`as_str`](Self::as_str),
/// `Deref`), compares with strings, and serializes as one.
///
/// # Example
/// ```
/// use token_billing::{Plan, TierLabel, calculate_billing_tier};
///
/// let label: TierLabel = calculate_billing_tier(&Plan::default(), 9_000_000)?.label();
/// assert_eq!(label, "8M-16M");
/// assert!(label.starts_with("8M"));
/// assert_eq!(serde_json::to_string(&label).unwrap(), r#""8M-16M""#);
/// assert_eq!(TierLabel::from("8M-16M"), label);
/// # Ok::<(), token_billing::RatingError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TierLabel(Arc<str>);

impl TierLabel {
    /// The label as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for TierLabel {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for TierLabel {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for TierLabel {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TierLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for TierLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<String> for TierLabel {
    fn from(label: String) -> Self {
        TierLabel(Arc::from(label))
    }
}

impl From<&str> for TierLabel {
    fn from(label: &str) -> Self {
        TierLabel(Arc::from(label))
    }
}

impl From<TierLabel> for String {
    fn from(label: TierLabel) -> Self {
        label.0.to_string()
    }
}

impl PartialEq<str> for TierLabel {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for TierLabel {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for TierLabel {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<TierLabel> for str {
    fn eq(&self, other: &TierLabel) -> bool {
        self == &*other.0
    }
}

impl PartialEq<TierLabel> for &str {
    fn eq(&self, other: &TierLabel) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<TierLabel> for String {
    fn eq(&self, other: &TierLabel) -> bool {
        **self == *other.0
    }
}

impl Serialize for TierLabel {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TierLabel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(TierLabel::from)
    }
}

/// Writes a token count exactly in compact units: `M` from a million, `K` from a thousand, plain
/// below, with as many decimals as needed and no trailing zeros (`1.5M`, `750K`, `1.000001M`).
fn write_compact(out: &mut (impl fmt::Write + ?Sized), tokens: u64) -> fmt::Result {
    let (unit, suffix) = match tokens {
        1_000_000.. => (1_000_000, "M"),
        1_000.. => (1_000, "K"),
        _ => return write!(out, "{tokens}"),
    };
    let whole = tokens / unit;
    let fraction = tokens % unit;
    if fraction == 0 {
        return write!(out, "{whole}{suffix}");
    }
    let width = if unit == 1_000_000 { 6 } else { 3 };
    let mut digits = format!("{fraction:0width$}");
    while digits.ends_with('0') {
        digits.pop();
    }
    write!(out, "{whole}.{digits}{suffix}")
}

/// The stable label of the tier a period total is in: the Rust twin of the original product's SQL function
/// `calculate_billing_tier(tokens_used)`.
///
/// # Errors
/// [`RatingError::TokensOutOfRange`] above [`MAX_TOKENS`].
///
/// # Example
/// ```
/// let plan = token_billing::Plan::default();
/// assert_eq!(token_billing::calculate_billing_tier(&plan, 1_000_000)?.label(), "0-8M");
/// assert_eq!(token_billing::calculate_billing_tier(&plan, 8_000_000)?.label(), "0-8M");
/// assert_eq!(token_billing::calculate_billing_tier(&plan, 8_000_001)?.label(), "8M-16M");
/// # Ok::<(), token_billing::RatingError>(())
/// ```
pub fn calculate_billing_tier(plan: &Plan, tokens: u64) -> Result<Tier, RatingError> {
    plan.tier_of(tokens)
}

/// A run of consecutive block indices, `first..end` (empty when `first == end`).
///
/// # Example
/// ```
/// let plan = token_billing::Plan::default();
/// let blocks = plan.blocks_crossed(8_000_000, 8_000_001)?;
/// assert_eq!((blocks.first(), blocks.len()), (1, 1));
/// assert!(plan.blocks_crossed(8_000_001, 16_000_000)?.is_empty());
/// # Ok::<(), token_billing::RatingError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Blocks {
    first: u64,
    end: u64,
}

impl Blocks {
    pub(crate) const fn new(first: u64, end: u64) -> Blocks {
        Blocks { first, end }
    }

    /// The first block index in the run.
    pub const fn first(&self) -> u64 {
        self.first
    }

    /// One past the last block index.
    pub const fn end(&self) -> u64 {
        self.end
    }

    /// How many blocks.
    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.first)
    }

    /// Whether the run is empty.
    pub const fn is_empty(&self) -> bool {
        self.end <= self.first
    }
}

impl IntoIterator for Blocks {
    type Item = u64;
    type IntoIter = std::ops::Range<u64>;
    fn into_iter(self) -> Self::IntoIter {
        self.first..self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(included: u64, block: u64) -> Plan {
        Plan::builder()
            .included_tokens(included)
            .block_size(block)
            .build()
            .expect("valid")
    }

    #[test]
    fn a_label_reads_compares_and_travels_as_its_text() {
        let label = Plan::default().tier_of(9_000_000).expect("in range").label();
        assert_eq!(label.to_string(), "8M-16M");
        assert_eq!(format!("{label:?}"), r#""8M-16M""#);
        assert_eq!(label, "8M-16M");
        assert_eq!("8M-16M", label);
        assert_eq!(label, String::from("8M-16M"));
        assert_ne!(label, "0-8M");
        let json = serde_json::to_string(&label).expect("serialise");
        assert_eq!(json, r#""8M-16M""#);
        assert_eq!(serde_json::from_str::<TierLabel>(&json).expect("deserialise"), label);
        assert_eq!(String::from(label.clone()), "8M-16M");
        // The same tier twice on one thread: one shared text, not two.
        let again = Plan::default().tier_of(10_000_000).expect("in range").label();
        assert!(std::ptr::eq(label.as_str(), again.as_str()));
        // Ordered as its text, so a sorted list of labels reads as sorted strings.
        let mut labels = vec![
            TierLabel::from("8M-16M"),
            TierLabel::from("16M-24M"),
            TierLabel::from("0-8M"),
        ];
        labels.sort();
        assert_eq!(labels, ["0-8M", "16M-24M", "8M-16M"]);
    }

    #[test]
    fn seed_labels() {
        let p = Plan::default();
        let labels: Vec<TierLabel> = [0, 1_000_000, 8_000_000, 8_000_001, 16_000_000, 16_000_001, 24_000_001]
            .into_iter()
            .map(|t| p.tier_of(t).expect("in range").label())
            .collect();
        assert_eq!(
            labels,
            ["0-8M", "0-8M", "0-8M", "8M-16M", "8M-16M", "16M-24M", "24M-32M"]
        );
        assert_eq!(
            plan(4_000_000, 8_000_000).tier_of(5_000_000).expect("in range").label(),
            "4M-12M"
        );
    }

    #[test]
    fn exact_labels_for_sizes_that_are_not_whole_millions() {
        assert_eq!(
            plan(1_500_000, 1_500_000).tier_of(2_000_000).expect("ok").label(),
            "1.5M-3M"
        );
        assert_eq!(
            plan(750_000, 750_000).tier_of(1_000_000).expect("ok").label(),
            "750K-1.5M"
        );
        assert_eq!(plan(500, 250).tier_of(600).expect("ok").label(), "500-750");
        assert_eq!(
            plan(999_999, 1_000_000).tier_of(1_000_000).expect("ok").label(),
            "999.999K-1.999999M"
        );
        assert_eq!(plan(0, 1_250).tier_of(0).expect("ok").label(), "0-0");
        assert_eq!(plan(0, 1_250).tier_of(1).expect("ok").label(), "0-1.25K");
        assert_eq!(
            plan(1_000_000_000, 1_000_000).tier_of(0).expect("ok").label(),
            "0-1000M"
        );
    }

    #[test]
    fn blocks_owed_boundaries() {
        let p = Plan::default();
        assert_eq!(p.blocks_owed(0), 0);
        assert_eq!(p.blocks_owed(8_000_000), 0);
        assert_eq!(p.blocks_owed(8_000_001), 1);
        assert_eq!(p.blocks_owed(16_000_000), 1);
        assert_eq!(p.blocks_owed(16_000_001), 2);
        assert!(matches!(
            p.blocks_crossed(2, 1),
            Err(RatingError::TotalDecreased { .. })
        ));
        assert!(p.blocks_crossed(0, MAX_TOKENS + 1).is_err());
    }
}
