//! Rate cards: exact weights per token class and model, which turn a call's token counts into
//! billable tokens.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ids::{IdBytes, ModelName};
use super::tokens::{BillableTokens, MICROS_PER_TOKEN, TokenClass, TokenCounts, deserialize_decimal, parse_micros};

/// Why a weight or a rate card was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateCardError {
    /// A weight is not a decimal number with at most six digits after the point.
    #[error("weight {text:?} is not a decimal number with at most 6 decimal places (write \"0.1\", not 0.1)")]
    BadWeight {
        /// The text given.
        text: String,
    },
    /// A weight is above [`Weight::MAX`].
    #[error("weight {text} is above the largest accepted, {max}")]
    WeightTooLarge {
        /// The weight given.
        text: String,
        /// The largest accepted.
        max: Weight,
    },
    /// A model pattern is empty, has a character outside printable ASCII, or a `*` anywhere but
    /// at its end.
    #[error("model pattern {pattern:?} is not a model name, or a prefix ending in one `*`")]
    BadPattern {
        /// The pattern given.
        pattern: String,
    },
}

/// An exact, non-negative weight with at most six decimal places: how many billable tokens one
/// token of a class counts for. Written as a string (`"0.1"`, `"1.25"`) or an integer (`4`) in
/// serialised forms, never as a floating-point number, which could not hold `0.1` exactly.
///
/// # Example
/// ```
/// use token_billing::Weight;
///
/// let weight: Weight = "1.25".parse()?;
/// assert_eq!(weight.micros(), 1_250_000);
/// assert_eq!(weight.to_string(), "1.25");
/// assert!("0.1234567".parse::<Weight>().is_err());
/// # Ok::<(), token_billing::RateCardError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Weight {
    micros: u64,
}

impl Weight {
    /// Weight 1: the token counts as one billable token.
    pub const ONE: Weight = Weight {
        micros: MICROS_PER_TOKEN,
    };
    /// The largest weight accepted: 1,000,000.
    pub const MAX: Weight = Weight {
        micros: MICROS_PER_TOKEN * MICROS_PER_TOKEN,
    };

    /// A weight in millionths.
    ///
    /// # Errors
    /// [`RateCardError::WeightTooLarge`] above [`Weight::MAX`].
    pub fn from_micros(micros: u64) -> Result<Weight, RateCardError> {
        let weight = Weight { micros };
        if weight > Weight::MAX {
            return Err(RateCardError::WeightTooLarge {
                text: weight.to_string(),
                max: Weight::MAX,
            });
        }
        Ok(weight)
    }

    /// The weight in millionths.
    pub fn micros(self) -> u64 {
        self.micros
    }
}

impl FromStr for Weight {
    type Err = RateCardError;

    fn from_str(text: &str) -> Result<Weight, RateCardError> {
        let micros = parse_micros(text).ok_or_else(|| RateCardError::BadWeight { text: text.to_owned() })?;
        u64::try_from(micros)
            .ok()
            .and_then(|micros| Weight::from_micros(micros).ok())
            .ok_or_else(|| RateCardError::WeightTooLarge {
                text: text.to_owned(),
                max: Weight::MAX,
            })
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        BillableTokens::from_micros(u128::from(self.micros)).fmt(f)
    }
}

impl Serialize for Weight {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Weight, D::Error> {
        deserialize_decimal(deserializer, "weight")
    }
}

/// The weights of one row of a rate card, one per token class.
///
/// In serialised forms a class left out weighs 1, except `reasoning`, which weighs as `output`
/// does (every provider prices reasoning tokens as output).
///
/// # Example
/// ```
/// use token_billing::{ClassWeights, TokenCounts};
///
/// let weights: ClassWeights = serde_json::from_str(r#"{"cached_input": "0.1", "output": 5}"#)?;
/// assert_eq!(weights.reasoning, weights.output);
/// let counts = TokenCounts { input: 100, cached_input: 1_000, output: 10, reasoning: 10, ..Default::default() };
/// assert_eq!(weights.billable(&counts).to_string(), "300");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ClassWeights {
    /// [`TokenCounts::input`]'s weight.
    pub input: Weight,
    /// [`TokenCounts::cached_input`]'s weight.
    pub cached_input: Weight,
    /// [`TokenCounts::cache_write`]'s weight.
    pub cache_write: Weight,
    /// [`TokenCounts::output`]'s weight.
    pub output: Weight,
    /// [`TokenCounts::reasoning`]'s weight. A serialised row without it takes `output`'s; a row
    /// built in Rust names it, or sets both with [`with_output`](Self::with_output).
    pub reasoning: Weight,
}

impl Default for ClassWeights {
    /// Every class weighs 1.
    fn default() -> ClassWeights {
        ClassWeights::uniform(Weight::ONE)
    }
}

impl<'de> Deserialize<'de> for ClassWeights {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ClassWeights, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Form {
            input: Option<Weight>,
            cached_input: Option<Weight>,
            cache_write: Option<Weight>,
            output: Option<Weight>,
            reasoning: Option<Weight>,
        }
        let form = Form::deserialize(deserializer)?;
        let output = form.output.unwrap_or(Weight::ONE);
        Ok(ClassWeights {
            input: form.input.unwrap_or(Weight::ONE),
            cached_input: form.cached_input.unwrap_or(Weight::ONE),
            cache_write: form.cache_write.unwrap_or(Weight::ONE),
            output,
            reasoning: form.reasoning.unwrap_or(output),
        })
    }
}

impl ClassWeights {
    /// The same weight for every class.
    pub fn uniform(weight: Weight) -> ClassWeights {
        ClassWeights {
            input: weight,
            cached_input: weight,
            cache_write: weight,
            output: weight,
            reasoning: weight,
        }
    }

    /// The row with `weight` for output and for reasoning (which every provider prices as
    /// output).
    ///
    /// # Example
    /// ```
    /// use token_billing::{ClassWeights, Weight};
    ///
    /// let row = ClassWeights::default().with_output("4".parse()?);
    /// assert_eq!((row.output, row.reasoning, row.input), (row.output, "4".parse()?, Weight::ONE));
    /// # Ok::<(), token_billing::RateCardError>(())
    /// ```
    pub fn with_output(mut self, weight: Weight) -> ClassWeights {
        self.output = weight;
        self.reasoning = weight;
        self
    }

    /// The weight of one class.
    pub fn get(&self, class: TokenClass) -> Weight {
        match class {
            TokenClass::Input => self.input,
            TokenClass::CachedInput => self.cached_input,
            TokenClass::CacheWrite => self.cache_write,
            TokenClass::Output => self.output,
            TokenClass::Reasoning => self.reasoning,
        }
    }

    /// The exact billable tokens of `counts`: the sum of each class's count times its weight.
    /// Linear in the counts, so splitting a call's counts over several events never changes
    /// the sum.
    pub fn billable(&self, counts: &TokenCounts) -> BillableTokens {
        // Widening multiplications (one instruction each) summed in u128, written out: each
        // product is below 2^64 * 2^40, so five cannot overflow. A loop over the classes, with
        // a `match` per class or overflow checks in u64, took three times as long in
        // `cargo bench --bench rating`.
        let product = |count: u64, weight: Weight| u128::from(count) * u128::from(weight.micros);
        BillableTokens::from_micros(
            product(counts.input, self.input)
                + product(counts.cached_input, self.cached_input)
                + product(counts.cache_write, self.cache_write)
                + product(counts.output, self.output)
                + product(counts.reasoning, self.reasoning),
        )
    }
}

/// Checks a model pattern: an exact name (`gpt-4o-mini`) or a prefix ending in `*` (`gpt-4o*`,
/// or `*` alone); answers the name or the prefix, and whether it is a prefix.
fn pattern(text: &str) -> Result<(&str, bool), RateCardError> {
    let bad = || RateCardError::BadPattern {
        pattern: text.to_owned(),
    };
    let (name, prefix) = match text.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (text, false),
    };
    if name.contains('*') || (name.is_empty() && !prefix) {
        return Err(bad());
    }
    if !name.is_empty() {
        ModelName::new(name).map_err(|_| bad())?;
    }
    Ok((name, prefix))
}

/// A rate card: the weights of each token class, per model, with a default row for the models
/// it does not name and for calls that name no model.
///
/// A model takes the row of its exact name; else the row of the longest prefix (`gpt-4o*`) it
/// starts with; else the default row. Without a default row, models the card does not name
/// weigh 1 in every class.
///
/// Billable tokens are exact (weights are decimals of at most six places, sums are kept in
/// millionths of a token): see [`BillableTotal`](crate::BillableTotal) for where a period's
/// total is rounded.
///
/// # Example
/// ```
/// use token_billing::{ModelName, RateCard, TokenCounts};
///
/// // Prices relative to input tokens: cache reads at a tenth, cache writes at 1.25, output at 5.
/// let card: RateCard = serde_json::from_value(serde_json::json!({
///     "default": { "output": 4 },
///     "models": {
///         "claude-*": { "cached_input": "0.1", "cache_write": "1.25", "output": 5 },
///         "claude-haiku-*": { "cached_input": "0.1", "cache_write": "1.25", "output": 4 }
///     }
/// }))?;
/// let counts = TokenCounts { input: 2_000, cached_input: 30_000, cache_write: 800, output: 500, ..Default::default() };
/// let sonnet = ModelName::new("claude-sonnet-4-5")?;
/// // 2,000 + 3,000 + 1,000 + 2,500
/// assert_eq!(card.billable(Some(&sonnet), &counts).to_string(), "8500");
/// let haiku = ModelName::new("claude-haiku-4-5")?;
/// assert_eq!(card.billable(Some(&haiku), &counts).to_string(), "8000");
/// // No model: the default row.
/// assert_eq!(card.billable(None, &counts).to_string(), "34800");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RateCard {
    default: ClassWeights,
    /// The rows of exact names, sorted by length, then name: found by a binary search that
    /// compares the bytes of names of the model's length only.
    exact: Vec<(Box<str>, ClassWeights)>,
    /// The rows of prefixes (without their `*`), longest first: the first a model starts
    /// with is the longest. Both orders are total, so cards with the same rows compare equal.
    prefixes: Vec<(Box<str>, ClassWeights)>,
}

impl RateCard {
    /// A card whose default row is `default` and that names no model yet.
    pub fn new(default: ClassWeights) -> RateCard {
        RateCard {
            default,
            exact: Vec::new(),
            prefixes: Vec::new(),
        }
    }

    /// The card with a row for `pattern`: an exact model name, or a prefix ending in `*`.
    /// A row for the same pattern is replaced.
    ///
    /// # Errors
    /// [`RateCardError::BadPattern`] when the pattern is not a model name or such a prefix.
    pub fn with_model(mut self, pattern: &str, weights: ClassWeights) -> Result<RateCard, RateCardError> {
        let (name, prefix) = self::pattern(pattern)?;
        let (rows, order): (_, fn(&str, &str) -> std::cmp::Ordering) = if prefix {
            (&mut self.prefixes, |a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)))
        } else {
            (&mut self.exact, |a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)))
        };
        match rows.binary_search_by(|(row, _)| order(row, name)) {
            Ok(at) => rows[at].1 = weights,
            Err(at) => rows.insert(at, (name.into(), weights)),
        }
        Ok(self)
    }

    /// The default row.
    pub fn default_weights(&self) -> &ClassWeights {
        &self.default
    }

    /// The row that prices `model` (the default row for `None`).
    pub fn weights_for(&self, model: Option<&ModelName>) -> &ClassWeights {
        // The model's bytes: its text without the UTF-8 check reading it as a `&str` costs,
        // which was most of a card's rating time in `cargo bench --bench rating`.
        let Some(model) = model.map(IdBytes::id_bytes) else {
            return &self.default;
        };
        let by_length = |(name, _): &(Box<str>, ClassWeights)| {
            name.len().cmp(&model.len()).then_with(|| name.as_bytes().cmp(model))
        };
        if let Ok(at) = self.exact.binary_search_by(by_length) {
            return &self.exact[at].1;
        }
        // The first byte tells most prefixes apart without calling `memcmp`.
        let first = model.first();
        self.prefixes
            .iter()
            .find(|(prefix, _)| {
                let prefix = prefix.as_bytes();
                (prefix.is_empty() || prefix.first() == first) && model.starts_with(prefix)
            })
            .map_or(&self.default, |(_, weights)| weights)
    }

    /// The rows of the card other than the default, as (pattern, weights), prefixes ending in
    /// `*`, in pattern order.
    fn rows(&self) -> std::collections::BTreeMap<String, &ClassWeights> {
        let exact = self.exact.iter().map(|(name, w)| (name.to_string(), w));
        let prefixes = self.prefixes.iter().map(|(prefix, w)| (format!("{prefix}*"), w));
        exact.chain(prefixes).collect()
    }

    /// The exact billable tokens of a call of `model` with `counts`.
    pub fn billable(&self, model: Option<&ModelName>, counts: &TokenCounts) -> BillableTokens {
        self.weights_for(model).billable(counts)
    }
}

impl Serialize for RateCard {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Form<'a> {
            default: &'a ClassWeights,
            models: std::collections::BTreeMap<String, &'a ClassWeights>,
        }
        Form {
            default: &self.default,
            models: self.rows(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RateCard {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RateCard, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Form {
            #[serde(default)]
            default: ClassWeights,
            #[serde(default)]
            models: std::collections::BTreeMap<String, ClassWeights>,
        }
        let form = Form::deserialize(deserializer)?;
        form.models
            .iter()
            .try_fold(RateCard::new(form.default), |card, (pattern, weights)| {
                card.with_model(pattern, *weights)
            })
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_exactly_or_not_at_all() {
        for (text, micros) in [
            ("0", 0),
            ("1", 1_000_000),
            ("0.1", 100_000),
            ("1.25", 1_250_000),
            ("0.000001", 1),
        ] {
            assert_eq!(text.parse::<Weight>().map(Weight::micros), Ok(micros), "{text}");
        }
        for text in ["", ".5", "1.", "-1", "1e3", "0.1234567", " 1", "1,5", "+1"] {
            assert!(
                matches!(text.parse::<Weight>(), Err(RateCardError::BadWeight { .. })),
                "{text:?} was accepted"
            );
        }
        assert!(matches!(
            "1000000.000001".parse::<Weight>(),
            Err(RateCardError::WeightTooLarge { .. })
        ));
        assert!(matches!(
            "99999999999999999999".parse::<Weight>(),
            Err(RateCardError::WeightTooLarge { .. })
        ));
        assert!(matches!(
            "999999999999999999999999999999999999999999".parse::<Weight>(),
            Err(RateCardError::BadWeight { .. })
        ));
        assert_eq!("1000000".parse::<Weight>(), Ok(Weight::MAX));
    }

    #[test]
    fn a_floating_point_weight_is_refused_with_a_hint() {
        let error = serde_json::from_str::<Weight>("0.1").unwrap_err().to_string();
        assert!(error.contains("\"0.1\""), "{error}");
        assert_eq!(serde_json::from_str::<Weight>("\"0.1\"").unwrap().micros(), 100_000);
        assert_eq!(serde_json::from_str::<Weight>("4").unwrap().micros(), 4_000_000);
        assert!(serde_json::from_str::<Weight>("-4").is_err());
    }

    #[test]
    fn the_exact_name_wins_then_the_longest_prefix_then_the_default() {
        let w = |n: u64| ClassWeights::uniform(Weight::from_micros(n * MICROS_PER_TOKEN).unwrap());
        let card = RateCard::new(w(1))
            .with_model("gpt-4o*", w(2))
            .and_then(|c| c.with_model("gpt-4o-mini*", w(3)))
            .and_then(|c| c.with_model("gpt-4o-mini-2024-07-18", w(4)))
            .unwrap();
        let model = |name: &str| ModelName::new(name).unwrap();
        assert_eq!(card.weights_for(Some(&model("gpt-4o-2024-08-06"))), &w(2));
        assert_eq!(card.weights_for(Some(&model("gpt-4o-mini"))), &w(3));
        assert_eq!(card.weights_for(Some(&model("gpt-4o-mini-2024-07-18"))), &w(4));
        assert_eq!(card.weights_for(Some(&model("o3"))), &w(1));
        assert_eq!(card.weights_for(None), &w(1));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for pattern in ["", "gpt*4o", "**", "has space", "gpt-4o**"] {
            assert!(
                RateCard::default()
                    .with_model(pattern, ClassWeights::default())
                    .is_err(),
                "{pattern:?}"
            );
        }
        // A lone `*` is a prefix every model has.
        assert!(RateCard::default().with_model("*", ClassWeights::default()).is_ok());
    }

    #[test]
    fn a_card_survives_its_serialised_form() {
        let card = RateCard::new(ClassWeights::default())
            .with_model(
                "claude-*",
                ClassWeights {
                    cached_input: "0.1".parse().unwrap(),
                    ..ClassWeights::default()
                },
            )
            .unwrap();
        let json = serde_json::to_value(&card).unwrap();
        assert_eq!(json["models"]["claude-*"]["cached_input"], "0.1");
        assert_eq!(serde_json::from_value::<RateCard>(json).unwrap(), card);
    }
}
