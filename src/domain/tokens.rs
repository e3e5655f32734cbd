//! Token classes and billable tokens: the counts of one call by class, the exact billable amount
//! a rate card makes of them, and a period's billable total, kept exactly and rounded up to a
//! whole token only where blocks are decided.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::rating::MAX_TOKENS;

/// Millionths in a token: the resolution of weights and of billable amounts.
pub const MICROS_PER_TOKEN: u64 = 1_000_000;

/// [`MICROS_PER_TOKEN`] as the type of a fraction of a token.
const MICROS_PER_TOKEN_U32: u32 = 1_000_000;
const _: () = assert!(MICROS_PER_TOKEN_U32 as u64 == MICROS_PER_TOKEN);

/// A remainder of a division by [`MICROS_PER_TOKEN`] as a `u32`, which it fits: a plain
/// conversion, on the path every rated event takes (a checked one cost `cargo bench --bench
/// rating` a tenth of its time).
#[allow(clippy::cast_possible_truncation)]
fn fraction_of(remainder: u64) -> u32 {
    debug_assert!(remainder < MICROS_PER_TOKEN);
    remainder as u32
}

/// The tokens of one call, by class. The classes are disjoint: a cached input token is not also
/// an input token, and a reasoning token is not also an output token. The providers' usage
/// objects are turned into this form by [`OpenAiUsage`](crate::OpenAiUsage),
/// [`AnthropicUsage`](crate::AnthropicUsage) and [`GeminiUsage`](crate::GeminiUsage).
///
/// # Example
/// ```
/// use token_billing::TokenCounts;
///
/// let counts = TokenCounts { input: 1_000, cached_input: 9_000, output: 300, ..TokenCounts::default() };
/// assert_eq!(counts.total(), Some(10_300));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenCounts {
    /// Input tokens read afresh: neither served from a cache nor written to one.
    pub input: u64,
    /// Input tokens served from the provider's prompt cache.
    pub cached_input: u64,
    /// Input tokens written to the provider's prompt cache.
    pub cache_write: u64,
    /// Output tokens, reasoning excluded.
    pub output: u64,
    /// Reasoning ("thinking") tokens the provider reports apart from the output.
    pub reasoning: u64,
}

/// One class of tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenClass {
    /// [`TokenCounts::input`].
    Input,
    /// [`TokenCounts::cached_input`].
    CachedInput,
    /// [`TokenCounts::cache_write`].
    CacheWrite,
    /// [`TokenCounts::output`].
    Output,
    /// [`TokenCounts::reasoning`].
    Reasoning,
}

impl TokenClass {
    /// Every class, in the order of [`TokenCounts`]'s fields.
    pub const ALL: [TokenClass; 5] = [
        TokenClass::Input,
        TokenClass::CachedInput,
        TokenClass::CacheWrite,
        TokenClass::Output,
        TokenClass::Reasoning,
    ];

    /// The class's name in serialised forms (`input`, `cached_input`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TokenClass::Input => "input",
            TokenClass::CachedInput => "cached_input",
            TokenClass::CacheWrite => "cache_write",
            TokenClass::Output => "output",
            TokenClass::Reasoning => "reasoning",
        }
    }
}

impl fmt::Display for TokenClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl TokenCounts {
    /// The counts kept as one column per class (in [`TokenClass::ALL`]'s order), when every
    /// column has one: a stored event reported its classes, or none of them.
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(crate) fn from_columns(columns: [Option<u64>; 5]) -> Option<TokenCounts> {
        let [input, cached_input, cache_write, output, reasoning] = columns;
        Some(TokenCounts {
            input: input?,
            cached_input: cached_input?,
            cache_write: cache_write?,
            output: output?,
            reasoning: reasoning?,
        })
    }

    /// The count of one class.
    pub fn get(&self, class: TokenClass) -> u64 {
        match class {
            TokenClass::Input => self.input,
            TokenClass::CachedInput => self.cached_input,
            TokenClass::CacheWrite => self.cache_write,
            TokenClass::Output => self.output,
            TokenClass::Reasoning => self.reasoning,
        }
    }

    /// All tokens of the call (the original product's `tokens_used`); `None` past `u64`.
    pub fn total(&self) -> Option<u64> {
        TokenClass::ALL
            .iter()
            .try_fold(0u64, |sum, class| sum.checked_add(self.get(*class)))
    }

    /// The sum of two calls' counts, class by class; `None` past `u64`.
    pub fn checked_add(&self, other: &TokenCounts) -> Option<TokenCounts> {
        Some(TokenCounts {
            input: self.input.checked_add(other.input)?,
            cached_input: self.cached_input.checked_add(other.cached_input)?,
            cache_write: self.cache_write.checked_add(other.cache_write)?,
            output: self.output.checked_add(other.output)?,
            reasoning: self.reasoning.checked_add(other.reasoning)?,
        })
    }
}

/// An exact number of billable tokens, in millionths of a token: what a rate card makes of a
/// call's [`TokenCounts`]. Sums of these are exact, so a period's billable total does not depend
/// on how its usage was split into events.
///
/// # Example
/// ```
/// use token_billing::BillableTokens;
///
/// let half = BillableTokens::from_micros(500_000);
/// assert_eq!(half.to_string(), "0.5");
/// assert_eq!(BillableTokens::whole(3).checked_add(half).unwrap().to_string(), "3.5");
/// ```
///
/// Serialised as its decimal text (`"12.5"`), which no JSON reader rounds; read from that text
/// or from a whole number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BillableTokens {
    micros: u128,
}

impl BillableTokens {
    /// Zero.
    pub const ZERO: BillableTokens = BillableTokens { micros: 0 };

    /// A whole number of tokens.
    pub fn whole(tokens: u64) -> BillableTokens {
        BillableTokens {
            micros: u128::from(tokens) * u128::from(MICROS_PER_TOKEN),
        }
    }

    /// An amount in millionths of a token.
    pub fn from_micros(micros: u128) -> BillableTokens {
        BillableTokens { micros }
    }

    /// The amount in millionths of a token.
    pub fn micros(self) -> u128 {
        self.micros
    }

    /// The whole tokens, the fraction dropped.
    pub fn whole_tokens(self) -> u128 {
        // In u64 when it fits (every amount short of 18 trillion tokens): a division by a
        // constant that compiles to a multiplication, where u128's is a library call. Rating
        // runs once per event, and `cargo bench --bench rating` holds it to twice the time of
        // rating without a card.
        match u64::try_from(self.micros) {
            Ok(micros) => u128::from(micros / MICROS_PER_TOKEN),
            Err(_) => self.micros / u128::from(MICROS_PER_TOKEN),
        }
    }

    /// The fraction of a token past the whole ones, in millionths (below 1,000,000).
    pub fn fraction_micros(self) -> u32 {
        // Below MICROS_PER_TOKEN, which fits u32; in u64 when it fits, as `whole_tokens`.
        match u64::try_from(self.micros) {
            Ok(micros) => fraction_of(micros % MICROS_PER_TOKEN),
            Err(_) => u32::try_from(self.micros % u128::from(MICROS_PER_TOKEN)).unwrap_or(MICROS_PER_TOKEN_U32 - 1),
        }
    }

    /// The amount rounded up to a whole token.
    pub fn ceil_tokens(self) -> u128 {
        self.micros.div_ceil(u128::from(MICROS_PER_TOKEN))
    }

    /// The amount rounded up to a whole token, as a count of tokens (`u64::MAX` past it): what
    /// a hold holds for it, and what a period's rounded total shows of it.
    ///
    /// # Example
    /// ```
    /// use token_billing::BillableTokens;
    ///
    /// assert_eq!(BillableTokens::from_micros(100_400_000).rounded_up(), 101);
    /// assert_eq!(BillableTokens::whole(7).rounded_up(), 7);
    /// assert_eq!(BillableTokens::from_micros(u128::MAX).rounded_up(), u64::MAX);
    /// ```
    pub fn rounded_up(self) -> u64 {
        u64::try_from(self.ceil_tokens()).unwrap_or(u64::MAX)
    }

    /// The sum; `None` past `u128`.
    pub fn checked_add(self, other: BillableTokens) -> Option<BillableTokens> {
        self.micros.checked_add(other.micros).map(BillableTokens::from_micros)
    }
}

impl fmt::Display for BillableTokens {
    /// The amount in decimal, without trailing zeros: `12`, `12.5`, `0.000001`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        super::padded(f, |out| {
            write!(out, "{}", self.whole_tokens())?;
            let fraction = self.fraction_micros();
            if fraction > 0 {
                let digits = format!("{fraction:06}");
                write!(out, ".{}", digits.trim_end_matches('0'))?;
            }
            Ok(())
        })
    }
}

/// Reads a non-negative decimal with at most six places (`12`, `0.5`, `1.000001`) in millionths;
/// `None` for anything else (signs, exponents, spaces, a bare point, past `u128`).
pub(crate) fn parse_micros(text: &str) -> Option<u128> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 6 || text.ends_with('.') {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let fraction: u128 = format!("{fraction:0<6}").parse().ok()?;
    whole.checked_mul(u128::from(MICROS_PER_TOKEN))?.checked_add(fraction)
}

/// Why a text is not a number of billable tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a non-negative decimal number with at most 6 decimal places")]
pub struct BillableTokensError {
    text: String,
}

impl std::str::FromStr for BillableTokens {
    type Err = BillableTokensError;

    /// Reads the decimal form [`Display`](fmt::Display) writes.
    fn from_str(text: &str) -> Result<BillableTokens, BillableTokensError> {
        parse_micros(text)
            .map(BillableTokens::from_micros)
            .ok_or_else(|| BillableTokensError { text: text.to_owned() })
    }
}

impl Serialize for BillableTokens {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BillableTokens {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<BillableTokens, D::Error> {
        deserialize_decimal(deserializer, "billable tokens")
    }
}

/// Reads an exact decimal serialised as text (`"12.5"`) or as a whole number, through its
/// `FromStr`; refuses a floating-point number, which cannot hold most decimals exactly, with
/// the text to write instead, and a negative one.
pub(crate) fn deserialize_decimal<'de, D, T>(deserializer: D, what: &'static str) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    struct Visitor<T>(&'static str, std::marker::PhantomData<T>);
    impl<T> serde::de::Visitor<'_> for Visitor<T>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{} as a decimal string (\"0.1\") or a whole number", self.0)
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<T, E> {
            text.parse().map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, whole: u64) -> Result<T, E> {
            whole.to_string().parse().map_err(E::custom)
        }
        fn visit_i64<E: serde::de::Error>(self, whole: i64) -> Result<T, E> {
            match u64::try_from(whole) {
                Ok(whole) => self.visit_u64(whole),
                Err(_) => Err(E::custom(format!("{} {whole} is negative", self.0))),
            }
        }
        fn visit_f64<E: serde::de::Error>(self, number: f64) -> Result<T, E> {
            Err(E::custom(format!(
                "{} {number} is a floating-point number, which cannot hold most decimals exactly: \
                 write it as a string, \"{number}\"",
                self.0
            )))
        }
    }
    deserializer.deserialize_any(Visitor(what, std::marker::PhantomData))
}

/// A period's billable total as stores keep it: `tokens` is the exact total rounded up to a whole
/// token, and `credit_micros` what that rounding added (below a token), so the exact total is
/// `tokens - credit_micros / 1,000,000`.
///
/// Blocks, tiers, caps and summaries read `tokens`. Since a block boundary is a whole number of
/// tokens `B`, "the exact total passes `B`" and "the rounded-up total passes `B`" are the same
/// statement: rounding up decides every block exactly as the exact total would, and the exact
/// total is the same whatever the split of the usage, so the blocks are too.
///
/// # Example
/// ```
/// use token_billing::{BillableTokens, BillableTotal};
///
/// // Three events of 0.4 tokens: 1.2 tokens, billed as 2 whole ones.
/// let event = BillableTokens::from_micros(400_000);
/// let mut total = BillableTotal::default();
/// for _ in 0..3 {
///     total = total.plus(event).unwrap();
/// }
/// assert_eq!((total.tokens, total.credit_micros), (2, 800_000));
/// assert_eq!(total.exact().to_string(), "1.2");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BillableTotal {
    /// The exact total rounded up to a whole token.
    pub tokens: u64,
    /// What rounding up added, in millionths of a token (below 1,000,000).
    pub credit_micros: u32,
}

impl BillableTotal {
    /// A whole total (no rounding).
    pub fn whole(tokens: u64) -> BillableTotal {
        BillableTotal {
            tokens,
            credit_micros: 0,
        }
    }

    /// The exact total.
    pub fn exact(self) -> BillableTokens {
        BillableTokens::from_micros(
            u128::from(self.tokens) * u128::from(MICROS_PER_TOKEN) - u128::from(self.credit_micros),
        )
    }

    /// The total after an event of `event` billable tokens; `None` when it would pass
    /// [`MAX_TOKENS`] or the total is malformed (a credit of a whole token or more, or on a
    /// zero total).
    ///
    /// This is the one rule every store applies (PostgreSQL in SQL: `sql/increment_period_total.sql`):
    /// the whole tokens of the event are added, plus one when the event's fraction is more than
    /// the credit left.
    pub fn plus(self, event: BillableTokens) -> Option<BillableTotal> {
        if u64::from(self.credit_micros) >= MICROS_PER_TOKEN || (self.tokens == 0 && self.credit_micros > 0) {
            return None;
        }
        // One division of the amount in u64, when it fits (see `whole_tokens`).
        let (whole, fraction) = match u64::try_from(event.micros) {
            Ok(micros) => (micros / MICROS_PER_TOKEN, fraction_of(micros % MICROS_PER_TOKEN)),
            Err(_) => (u64::try_from(event.whole_tokens()).ok()?, event.fraction_micros()),
        };
        let (carry, credit) = if fraction > self.credit_micros {
            (1, MICROS_PER_TOKEN_U32 - (fraction - self.credit_micros))
        } else {
            (0, self.credit_micros - fraction)
        };
        let tokens = self.tokens.checked_add(whole)?.checked_add(carry)?;
        (tokens <= MAX_TOKENS).then_some(BillableTotal {
            tokens,
            credit_micros: credit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_total_is_the_exact_sum_rounded_up() {
        let mut total = BillableTotal::default();
        let mut exact = 0u128;
        for micros in [1, 999_999, 1_500_000, 250_000, 750_000, 3_000_000, 10] {
            total = total.plus(BillableTokens::from_micros(micros)).expect("in range");
            exact += micros;
            assert_eq!(u128::from(total.tokens), exact.div_ceil(1_000_000));
            assert_eq!(total.exact().micros(), exact);
        }
    }

    #[test]
    fn a_malformed_or_overflowing_total_is_refused() {
        let credit_too_large = BillableTotal {
            tokens: 5,
            credit_micros: 1_000_000,
        };
        assert_eq!(credit_too_large.plus(BillableTokens::ZERO), None);
        assert_eq!(
            BillableTotal::whole(MAX_TOKENS).plus(BillableTokens::from_micros(1)),
            None
        );
        assert_eq!(
            BillableTotal::whole(MAX_TOKENS - 1).plus(BillableTokens::from_micros(1)),
            Some(BillableTotal {
                tokens: MAX_TOKENS,
                credit_micros: 999_999
            })
        );
    }

    #[test]
    fn billable_tokens_display_as_exact_decimals() {
        assert_eq!(BillableTokens::whole(12).to_string(), "12");
        assert_eq!(BillableTokens::from_micros(12_500_000).to_string(), "12.5");
        assert_eq!(BillableTokens::from_micros(1).to_string(), "0.000001");
        assert_eq!(format!("{:>6}|", BillableTokens::from_micros(2_250_000)), "  2.25|");
        for micros in [0, 1, 999_999, 1_000_000, 12_500_000, u128::from(u64::MAX) * 3] {
            let amount = BillableTokens::from_micros(micros);
            assert_eq!(amount.to_string().parse(), Ok(amount));
            let json = serde_json::to_string(&amount).expect("serialised");
            assert_eq!(json, format!("\"{amount}\""));
            assert_eq!(
                serde_json::from_str::<BillableTokens>(&json).expect("read back"),
                amount
            );
        }
        assert_eq!(
            serde_json::from_str::<BillableTokens>("7").expect("a whole number"),
            BillableTokens::whole(7)
        );
        assert!(serde_json::from_str::<BillableTokens>("0.5").is_err(), "never a float");
        for text in ["", "-1", "1.", ".5", "1.0000001", "1e3", " 1"] {
            assert!(text.parse::<BillableTokens>().is_err(), "{text:?}");
        }
    }
}
