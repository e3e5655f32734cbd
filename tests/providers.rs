//! The providers' usage objects against golden vectors (`tests/golden/provider_usage.json`),
//! each stating the documented rule it checks; and normalisers that break a rule (counting
//! cached tokens twice) failing them.

use serde::Deserialize;
use token_billing::{ProviderUsage, TokenCounts, UsageObjectError, UsageReport};

#[derive(Deserialize)]
struct Golden {
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    rule: String,
    provider: String,
    usage: serde_json::Value,
    expected: Option<TokenCounts>,
    error: Option<String>,
    missing: Option<String>,
}

impl Vector {
    fn usage(&self) -> ProviderUsage {
        serde_json::from_value(serde_json::json!({ "provider": self.provider, "usage": self.usage }))
            .unwrap_or_else(|e| panic!("{}: not a {} usage object: {e}", self.name, self.provider))
    }
}

fn golden() -> Vec<Vector> {
    let text = include_str!("golden/provider_usage.json");
    serde_json::from_str::<Golden>(text)
        .expect("the golden file reads")
        .vectors
}

type Normaliser = fn(&ProviderUsage) -> Result<TokenCounts, UsageObjectError>;

/// The vectors a normaliser answers wrongly, by name.
fn failures(normalise: Normaliser) -> Vec<String> {
    golden()
        .iter()
        .filter(|vector| {
            let answer = normalise(&vector.usage());
            match (&vector.expected, &vector.error, &vector.missing) {
                (Some(expected), None, None) => answer.as_ref() != Ok(expected),
                (None, Some(part), None) => !matches!(
                    answer,
                    Err(UsageObjectError::PartLargerThanWhole { part: p, .. }) if p == part
                ),
                (None, None, Some(field)) => !matches!(
                    answer,
                    Err(UsageObjectError::Missing { field: f, .. }) if f == field
                ),
                _ => panic!(
                    "{}: a vector gives one of `expected`, `error` or `missing`",
                    vector.name
                ),
            }
        })
        .map(|vector| vector.name.clone())
        .collect()
}

#[test]
fn the_normalisers_pass_every_golden_vector() {
    let vectors = golden();
    assert!(vectors.len() >= 15, "the golden file lost vectors");
    for provider in ["openai", "anthropic", "gemini"] {
        let of = |pred: fn(&Vector) -> bool| vectors.iter().any(|v| v.provider == provider && pred(v));
        assert!(
            of(|v| v.expected.is_some_and(|c| c.cached_input > 0)),
            "{provider}: a cache read"
        );
        assert!(
            of(|v| v.error.is_some() || v.missing.is_some()),
            "{provider}: an inconsistent object"
        );
    }
    assert!(
        vectors.iter().any(|v| v.expected.is_some_and(|c| c.cache_write > 0)),
        "a cache write"
    );
    assert!(
        vectors.iter().any(|v| v.expected.is_some_and(|c| c.reasoning > 0)),
        "reasoning"
    );
    for vector in &vectors {
        assert!(vector.rule.len() > 20, "{}: states the rule it checks", vector.name);
    }
    assert_eq!(failures(ProviderUsage::token_counts), Vec::<String>::new());
}

/// The most common mis-billing: reading the prompt as fresh input and adding the cached tokens
/// beside it, so that every cached token counts twice.
fn cached_twice(usage: &ProviderUsage) -> Result<TokenCounts, UsageObjectError> {
    let counts = usage.token_counts()?;
    Ok(match usage {
        ProviderUsage::Anthropic(_) => counts,
        _ => TokenCounts {
            input: counts.input + counts.cached_input,
            ..counts
        },
    })
}

/// The opposite mistake on Anthropic: taking `input_tokens` to include the cache reads, as
/// OpenAI's prompt does, and taking them out of it.
fn anthropic_as_openai(usage: &ProviderUsage) -> Result<TokenCounts, UsageObjectError> {
    let counts = usage.token_counts()?;
    Ok(match usage {
        ProviderUsage::Anthropic(_) => TokenCounts {
            input: counts.input.saturating_sub(counts.cached_input),
            ..counts
        },
        _ => counts,
    })
}

#[test]
fn a_normaliser_counting_cached_tokens_twice_fails_the_vectors_with_cache_reads() {
    let expected: Vec<String> = golden()
        .iter()
        .filter(|v| v.provider != "anthropic" && v.expected.is_some_and(|c| c.cached_input > 0))
        .map(|v| v.name.clone())
        .collect();
    assert!(expected.len() >= 4);
    assert_eq!(failures(cached_twice), expected);
}

#[test]
fn a_normaliser_reading_anthropic_input_as_inclusive_fails_its_cache_vectors() {
    let failed = failures(anthropic_as_openai);
    assert!(failed.contains(&"anthropic-cache-read".to_owned()), "{failed:?}");
    assert!(
        failed.contains(&"anthropic-stream-final-delta".to_owned()),
        "{failed:?}"
    );
    assert!(failed.iter().all(|name| name.starts_with("anthropic-")), "{failed:?}");
}

#[test]
fn a_report_from_a_usage_object_counts_every_token_once() {
    for vector in golden() {
        match (vector.expected, &vector.error) {
            (Some(expected), _) => {
                let report = UsageReport::from_provider_usage("user-uuid", &vector.usage(), "chat").expect("a report");
                assert_eq!(report.token_counts, Some(expected), "{}", vector.name);
                assert_eq!(Some(report.tokens_used), expected.total(), "{}", vector.name);
            }
            (None, _) => assert!(
                matches!(
                    UsageReport::from_provider_usage("user-uuid", &vector.usage(), "chat"),
                    Err(token_billing::UsageError::UsageObject(_))
                ),
                "{}",
                vector.name
            ),
        }
    }
}

#[test]
fn a_stream_is_billed_from_its_final_cumulative_usage() {
    use token_billing::AnthropicUsage;
    let start: AnthropicUsage =
        serde_json::from_str(r#"{"input_tokens": 472, "cache_read_input_tokens": 8192, "output_tokens": 1}"#)
            .expect("message_start usage");
    // The delta alone is refused: it would bill the output only.
    let delta_alone: AnthropicUsage = serde_json::from_str(r#"{"output_tokens": 1503}"#).expect("delta");
    assert!(matches!(
        delta_alone.token_counts(),
        Err(UsageObjectError::Missing {
            field: "input_tokens",
            ..
        })
    ));
    // An older stream's message_delta gives only the output so far; a newer one repeats all.
    let older: AnthropicUsage = serde_json::from_str(r#"{"output_tokens": 1503}"#).expect("delta");
    let newer: AnthropicUsage = serde_json::from_str(
        r#"{"input_tokens": 472, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 8192, "output_tokens": 1503}"#,
    )
    .expect("delta");
    let expected = TokenCounts {
        input: 472,
        cached_input: 8192,
        output: 1503,
        ..TokenCounts::default()
    };
    assert_eq!(start.updated_by(&older).token_counts(), Ok(expected));
    assert_eq!(start.updated_by(&newer).token_counts(), Ok(expected));
}
