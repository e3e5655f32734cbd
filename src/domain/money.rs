//! Currencies and exact money amounts.
//!
//! Inside the library an amount is a [`Decimal`] in major units (`400.00` reais); at every edge
//! (the database, the payment gateway, the original product's JSON) it is an integer count of minor units
//! (`40000` centavos). The currency's ISO 4217 exponent decides the conversion: never `x100`,
//! because JPY has no minor unit and BHD has three decimals.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A currency from ISO 4217, with the number of decimals its minor unit has.
///
/// # Example
/// ```
/// use token_billing::Currency;
///
/// assert_eq!(Currency::BRL.exponent(), 2);
/// assert_eq!(Currency::JPY.exponent(), 0);
/// assert_eq!(Currency::BHD.exponent(), 3);
/// assert_eq!("brl".parse::<Currency>().unwrap(), Currency::BRL);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
#[non_exhaustive]
pub enum Currency {
    /// United Arab Emirates dirham.
    AED,
    /// Argentine peso.
    ARS,
    /// Australian dollar.
    AUD,
    /// Bahraini dinar (three decimals).
    BHD,
    /// Brazilian real, the original product's currency.
    BRL,
    /// Canadian dollar.
    CAD,
    /// Swiss franc.
    CHF,
    /// Chilean peso (no decimals).
    CLP,
    /// Chinese yuan.
    CNY,
    /// Colombian peso.
    COP,
    /// Czech koruna.
    CZK,
    /// Danish krone.
    DKK,
    /// Euro.
    EUR,
    /// Pound sterling.
    GBP,
    /// Hong Kong dollar.
    HKD,
    /// Hungarian forint.
    HUF,
    /// Indian rupee.
    INR,
    /// Icelandic króna (no decimals).
    ISK,
    /// Jordanian dinar (three decimals).
    JOD,
    /// Japanese yen (no decimals).
    JPY,
    /// South Korean won (no decimals).
    KRW,
    /// Kuwaiti dinar (three decimals).
    KWD,
    /// Mexican peso.
    MXN,
    /// Norwegian krone.
    NOK,
    /// New Zealand dollar.
    NZD,
    /// Omani rial (three decimals).
    OMR,
    /// Polish złoty.
    PLN,
    /// Swedish krona.
    SEK,
    /// Singapore dollar.
    SGD,
    /// Tunisian dinar (three decimals).
    TND,
    /// United States dollar.
    USD,
    /// Vietnamese đồng (no decimals).
    VND,
    /// South African rand.
    ZAR,
}

impl Currency {
    /// Every currency this version knows, in code order.
    pub const ALL: [Currency; 33] = [
        Currency::AED,
        Currency::ARS,
        Currency::AUD,
        Currency::BHD,
        Currency::BRL,
        Currency::CAD,
        Currency::CHF,
        Currency::CLP,
        Currency::CNY,
        Currency::COP,
        Currency::CZK,
        Currency::DKK,
        Currency::EUR,
        Currency::GBP,
        Currency::HKD,
        Currency::HUF,
        Currency::INR,
        Currency::ISK,
        Currency::JOD,
        Currency::JPY,
        Currency::KRW,
        Currency::KWD,
        Currency::MXN,
        Currency::NOK,
        Currency::NZD,
        Currency::OMR,
        Currency::PLN,
        Currency::SEK,
        Currency::SGD,
        Currency::TND,
        Currency::USD,
        Currency::VND,
        Currency::ZAR,
    ];

    /// The ISO 4217 alphabetic code, upper case (`"BRL"`).
    pub const fn code(self) -> &'static str {
        match self {
            Currency::AED => "AED",
            Currency::ARS => "ARS",
            Currency::AUD => "AUD",
            Currency::BHD => "BHD",
            Currency::BRL => "BRL",
            Currency::CAD => "CAD",
            Currency::CHF => "CHF",
            Currency::CLP => "CLP",
            Currency::CNY => "CNY",
            Currency::COP => "COP",
            Currency::CZK => "CZK",
            Currency::DKK => "DKK",
            Currency::EUR => "EUR",
            Currency::GBP => "GBP",
            Currency::HKD => "HKD",
            Currency::HUF => "HUF",
            Currency::INR => "INR",
            Currency::ISK => "ISK",
            Currency::JOD => "JOD",
            Currency::JPY => "JPY",
            Currency::KRW => "KRW",
            Currency::KWD => "KWD",
            Currency::MXN => "MXN",
            Currency::NOK => "NOK",
            Currency::NZD => "NZD",
            Currency::OMR => "OMR",
            Currency::PLN => "PLN",
            Currency::SEK => "SEK",
            Currency::SGD => "SGD",
            Currency::TND => "TND",
            Currency::USD => "USD",
            Currency::VND => "VND",
            Currency::ZAR => "ZAR",
        }
    }

    /// How many decimals the currency's minor unit has (ISO 4217 "minor unit").
    pub const fn exponent(self) -> u32 {
        match self {
            Currency::CLP | Currency::ISK | Currency::JPY | Currency::KRW | Currency::VND => 0,
            Currency::BHD | Currency::JOD | Currency::KWD | Currency::OMR | Currency::TND => 3,
            _ => 2,
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.code())
    }
}

impl FromStr for Currency {
    type Err = MoneyError;

    /// Parses an ISO 4217 code, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::ALL
            .into_iter()
            .find(|c| c.code().eq_ignore_ascii_case(s))
            .ok_or_else(|| MoneyError::UnknownCurrency(s.chars().take(16).collect()))
    }
}

impl TryFrom<String> for Currency {
    type Error = MoneyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.code().to_owned()
    }
}

/// Why an amount of money could not be made or combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MoneyError {
    /// The amount has more decimals than the currency's minor unit allows (`1.005` BRL).
    #[error("{amount} has more decimals than {currency} allows ({exponent})")]
    ExcessPrecision {
        /// The amount as given.
        amount: Decimal,
        /// Its currency.
        currency: Currency,
        /// The decimals the currency allows.
        exponent: u32,
    },
    /// The amount does not fit in a signed 64-bit count of minor units.
    #[error("{currency} amount out of range")]
    OutOfRange {
        /// The currency of the amount.
        currency: Currency,
    },
    /// Two amounts in different currencies were combined.
    #[error("cannot combine {left} with {right}")]
    CurrencyMismatch {
        /// The left operand's currency.
        left: Currency,
        /// The right operand's currency.
        right: Currency,
    },
    /// The currency code is not a known ISO 4217 code.
    #[error("unknown currency code {0:?}")]
    UnknownCurrency(String),
    /// The amount text is not a decimal number.
    #[error("invalid amount {0:?}")]
    InvalidAmount(String),
}

/// An exact amount of money in one currency.
///
/// A `Money` always holds a whole number of the currency's minor units, and that number fits in an
/// `i64`: both are checked when it is made, so [`Money::minor_units`] cannot fail and nothing is
/// ever rounded silently.
///
/// # Properties
/// For every currency `c` and every `i64` `n`, `Money::from_minor(n, c).minor_units() == n`; and
/// for every decimal `d` accepted by [`Money::new`], `Money::from_minor(m.minor_units(), c) == m`.
///
/// # Example
/// ```
/// use rust_decimal::Decimal;
/// use token_billing::{Currency, Money};
///
/// let fee = Money::new(Decimal::new(40000, 2), Currency::BRL)?; // BRL 400.00
/// assert_eq!(fee.minor_units(), 40000);
/// assert_eq!(Money::from_minor(40000, Currency::BRL), fee);
/// assert_eq!(fee.to_string(), "400.00 BRL");
///
/// // One yen is the smallest unit: 10 yen are 10 minor units, not 1000.
/// assert_eq!(Money::from_minor(10, Currency::JPY).amount(), Decimal::from(10));
///
/// // A third decimal in reais is refused, never rounded.
/// assert!(Money::new(Decimal::new(1005, 3), Currency::BRL).is_err());
/// # Ok::<(), token_billing::MoneyError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    minor: i64,
    currency: Currency,
}

impl Money {
    /// Makes an amount from major units, refusing excess precision and out-of-range values.
    ///
    /// # Errors
    /// [`MoneyError::ExcessPrecision`] when `amount` has more decimals than the currency allows
    /// (trailing zeros do not count: `400.000` BRL is fine), [`MoneyError::OutOfRange`] when the
    /// minor units do not fit in an `i64`.
    pub fn new(amount: Decimal, currency: Currency) -> Result<Money, MoneyError> {
        let exponent = currency.exponent();
        let normalized = amount.normalize();
        if normalized.scale() > exponent {
            return Err(MoneyError::ExcessPrecision {
                amount,
                currency,
                exponent,
            });
        }
        let scale = Decimal::from(10_i64.pow(exponent));
        let minor = normalized
            .checked_mul(scale)
            .and_then(|m| i64::try_from(m.normalize()).ok())
            .ok_or(MoneyError::OutOfRange { currency })?;
        Ok(Money { minor, currency })
    }

    /// Makes an amount from integer minor units (`40000` BRL minor units are BRL 400.00).
    pub const fn from_minor(minor: i64, currency: Currency) -> Money {
        Money { minor, currency }
    }

    /// Zero in `currency`.
    pub const fn zero(currency: Currency) -> Money {
        Money { minor: 0, currency }
    }

    /// The amount in integer minor units, as the gateway and the database see it.
    pub const fn minor_units(&self) -> i64 {
        self.minor
    }

    /// The amount in major units, with exactly the currency's number of decimals.
    pub fn amount(&self) -> Decimal {
        Decimal::new(self.minor, self.currency.exponent())
    }

    /// The currency.
    pub const fn currency(&self) -> Currency {
        self.currency
    }

    /// Whether the amount is below zero.
    pub const fn is_negative(&self) -> bool {
        self.minor < 0
    }

    /// Whether the amount is zero.
    pub const fn is_zero(&self) -> bool {
        self.minor == 0
    }

    /// The sum of two amounts in the same currency.
    ///
    /// # Errors
    /// [`MoneyError::CurrencyMismatch`] for different currencies, [`MoneyError::OutOfRange`] on
    /// overflow.
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            });
        }
        self.minor
            .checked_add(other.minor)
            .map(|minor| Money::from_minor(minor, self.currency))
            .ok_or(MoneyError::OutOfRange {
                currency: self.currency,
            })
    }

    /// The amount times a whole count (`block_price * blocks`).
    ///
    /// # Errors
    /// [`MoneyError::OutOfRange`] on overflow.
    pub fn checked_mul(self, count: u64) -> Result<Money, MoneyError> {
        i64::try_from(count)
            .ok()
            .and_then(|n| self.minor.checked_mul(n))
            .map(|minor| Money::from_minor(minor, self.currency))
            .ok_or(MoneyError::OutOfRange {
                currency: self.currency,
            })
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Money({} {})", self.amount(), self.currency)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        super::padded(f, |out| write!(out, "{} {}", self.amount(), self.currency))
    }
}

/// Serialised as `{"amount": "400.00", "currency": "BRL"}`: the amount is a string so no JSON
/// reader ever turns it into a float.
#[derive(Serialize, Deserialize)]
struct MoneyRepr {
    amount: String,
    currency: Currency,
}

impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        MoneyRepr {
            amount: self.amount().to_string(),
            currency: self.currency,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let repr = MoneyRepr::deserialize(deserializer)?;
        let amount = Decimal::from_str_exact(&repr.amount)
            .map_err(|_| serde::de::Error::custom(MoneyError::InvalidAmount(repr.amount.clone())))?;
        Money::new(amount, repr.currency).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponents_follow_iso_4217() {
        assert_eq!(Currency::USD.exponent(), 2);
        assert_eq!(Currency::EUR.exponent(), 2);
        assert_eq!(Currency::GBP.exponent(), 2);
        assert_eq!(Currency::JPY.exponent(), 0);
        assert_eq!(Currency::BHD.exponent(), 3);
    }

    #[test]
    fn all_codes_round_trip() {
        for c in Currency::ALL {
            assert_eq!(c.code().parse::<Currency>(), Ok(c));
        }
        assert!("XXX".parse::<Currency>().is_err());
    }

    #[test]
    fn trailing_zeros_are_not_excess_precision() {
        let m = Money::new(Decimal::new(400_000, 3), Currency::BRL).expect("400.000 is 400.00");
        assert_eq!(m.minor_units(), 40000);
        assert_eq!(m.amount().scale(), 2);
    }

    #[test]
    fn out_of_range_is_refused() {
        let huge = Decimal::from(i64::MAX);
        assert_eq!(
            Money::new(huge, Currency::BRL),
            Err(MoneyError::OutOfRange {
                currency: Currency::BRL
            })
        );
        assert!(
            Money::from_minor(i64::MAX, Currency::BRL)
                .checked_add(Money::from_minor(1, Currency::BRL))
                .is_err()
        );
        assert!(Money::from_minor(2, Currency::BRL).checked_mul(u64::MAX).is_err());
    }

    #[test]
    fn serde_uses_string_amounts() {
        let m = Money::from_minor(123_456, Currency::BHD);
        let json = serde_json::to_string(&m).expect("serialise");
        assert_eq!(json, r#"{"amount":"123.456","currency":"BHD"}"#);
        assert_eq!(serde_json::from_str::<Money>(&json).expect("deserialise"), m);
        assert!(serde_json::from_str::<Money>(r#"{"amount":"1.2345","currency":"BHD"}"#).is_err());
    }
}
