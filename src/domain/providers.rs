//! The providers' usage objects (OpenAI, Anthropic, Gemini) as they return them, and their
//! normalisation into disjoint [`TokenCounts`] from what each provider documents its fields to
//! include.
//!
//! The rules, each checked by a golden vector (`tests/golden/provider_usage.json`):
//! - OpenAI: `prompt_tokens` (Responses: `input_tokens`) *includes* `cached_tokens`, and
//!   `completion_tokens` (`output_tokens`) *includes* `reasoning_tokens`.
//! - Anthropic: `input_tokens` *excludes* `cache_read_input_tokens` and
//!   `cache_creation_input_tokens`, which are counted beside it; thinking is part of
//!   `output_tokens`. A stream's `message_delta` usage is cumulative.
//! - Gemini: `promptTokenCount` *includes* `cachedContentTokenCount`; `thoughtsTokenCount` and
//!   `toolUsePromptTokenCount` are counted apart from `candidatesTokenCount` and the prompt.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::tokens::TokenCounts;

/// An LLM provider whose usage object the library reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI: Chat Completions' and Responses' `usage`.
    OpenAi,
    /// Anthropic: Messages' `usage`, and a stream's final `message_delta` usage.
    Anthropic,
    /// Google Gemini: `usageMetadata`.
    Gemini,
}

impl Provider {
    /// The provider's name in serialised forms: `openai`, `anthropic`, `gemini`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A provider's usage object with the provider named: the form
/// `{"provider": "anthropic", "usage": {...}}` that the HTTP service takes.
///
/// # Example
/// ```
/// use token_billing::{ProviderUsage, TokenCounts};
///
/// let usage: ProviderUsage = serde_json::from_str(r#"{
///     "provider": "gemini",
///     "usage": { "promptTokenCount": 900, "cachedContentTokenCount": 600, "candidatesTokenCount": 50 }
/// }"#)?;
/// assert_eq!(usage.token_counts()?, TokenCounts { input: 300, cached_input: 600, output: 50, ..Default::default() });
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", content = "usage", rename_all = "lowercase")]
pub enum ProviderUsage {
    /// OpenAI's `usage`.
    OpenAi(OpenAiUsage),
    /// Anthropic's `usage`.
    Anthropic(AnthropicUsage),
    /// Gemini's `usageMetadata`.
    Gemini(GeminiUsage),
}

impl ProviderUsage {
    /// The provider.
    pub fn provider(&self) -> Provider {
        match self {
            ProviderUsage::OpenAi(_) => Provider::OpenAi,
            ProviderUsage::Anthropic(_) => Provider::Anthropic,
            ProviderUsage::Gemini(_) => Provider::Gemini,
        }
    }

    /// The disjoint counts, by the provider's rules.
    ///
    /// # Errors
    /// [`UsageObjectError`] when the object contradicts itself.
    pub fn token_counts(&self) -> Result<TokenCounts, UsageObjectError> {
        match self {
            ProviderUsage::OpenAi(usage) => usage.token_counts(),
            ProviderUsage::Anthropic(usage) => usage.token_counts(),
            ProviderUsage::Gemini(usage) => usage.token_counts(),
        }
    }
}

/// Why a provider's usage object was refused: it contradicts itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsageObjectError {
    /// A part is larger than the whole the provider documents it to be part of (more cached
    /// tokens than prompt tokens, a total below the sum of its parts).
    #[error("{provider} usage: {part} ({part_tokens}) is larger than {whole} ({whole_tokens}), which includes it")]
    PartLargerThanWhole {
        /// The provider.
        provider: Provider,
        /// The part's field.
        part: &'static str,
        /// Its value.
        part_tokens: u64,
        /// The whole's field.
        whole: &'static str,
        /// Its value.
        whole_tokens: u64,
    },
    /// The counts add up past `u64`.
    #[error("{provider} usage: the counts add up past the largest number of tokens")]
    Overflow {
        /// The provider.
        provider: Provider,
    },
    /// A count the whole call's usage always has is missing: the object is a partial report
    /// (a stream's `message_delta` without its `message_start`), which would bill too little.
    #[error(
        "{provider} usage: {field} is missing, so this is not the whole call's usage (combine a stream's reports first)"
    )]
    Missing {
        /// The provider.
        provider: Provider,
        /// The missing field.
        field: &'static str,
    },
}

/// `part` taken out of `whole`, or the error saying the part is larger.
fn part_of(
    provider: Provider,
    (part, part_tokens): (&'static str, u64),
    (whole, whole_tokens): (&'static str, u64),
) -> Result<u64, UsageObjectError> {
    whole_tokens
        .checked_sub(part_tokens)
        .ok_or(UsageObjectError::PartLargerThanWhole {
            provider,
            part,
            part_tokens,
            whole,
            whole_tokens,
        })
}

/// Checks a reported total against the counts it is the total of.
fn total_covers(
    provider: Provider,
    counts: TokenCounts,
    total: Option<(&'static str, u64)>,
) -> Result<TokenCounts, UsageObjectError> {
    let sum = counts.total().ok_or(UsageObjectError::Overflow { provider })?;
    if let Some((field, total)) = total {
        part_of(provider, ("the sum of the counts", sum), (field, total))?;
    }
    Ok(counts)
}

/// OpenAI's `usage`, from Chat Completions (`prompt_tokens`, `completion_tokens`, their
/// `*_details`) or from the Responses API (`input_tokens`, `output_tokens`, their `*_details`):
/// the same rules under two spellings, both read here. Fields the library does not need are
/// ignored.
///
/// # Example
/// ```
/// use token_billing::{OpenAiUsage, TokenCounts};
///
/// let usage: OpenAiUsage = serde_json::from_str(r#"{
///     "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
///     "prompt_tokens_details": { "cached_tokens": 1920 },
///     "completion_tokens_details": { "reasoning_tokens": 256 }
/// }"#)?;
/// assert_eq!(
///     usage.token_counts()?,
///     TokenCounts { input: 86, cached_input: 1920, cache_write: 0, output: 44, reasoning: 256 }
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenAiUsage {
    /// Prompt tokens, cached ones included (`input_tokens` in the Responses API).
    #[serde(alias = "input_tokens")]
    pub prompt_tokens: u64,
    /// Completion tokens, reasoning included (`output_tokens` in the Responses API).
    #[serde(alias = "output_tokens")]
    pub completion_tokens: u64,
    /// The reported total, when there is one.
    #[serde(default)]
    pub total_tokens: Option<u64>,
    /// The prompt's details (`input_tokens_details`).
    #[serde(default, alias = "input_tokens_details")]
    pub prompt_tokens_details: Option<OpenAiPromptDetails>,
    /// The completion's details (`output_tokens_details`).
    #[serde(default, alias = "output_tokens_details")]
    pub completion_tokens_details: Option<OpenAiCompletionDetails>,
}

/// OpenAI's `prompt_tokens_details` (`input_tokens_details`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenAiPromptDetails {
    /// Prompt tokens served from the cache, part of `prompt_tokens`.
    #[serde(default)]
    pub cached_tokens: Option<u64>,
}

/// OpenAI's `completion_tokens_details` (`output_tokens_details`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenAiCompletionDetails {
    /// Reasoning tokens, part of `completion_tokens`.
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
}

impl OpenAiUsage {
    /// The disjoint counts: cached tokens taken out of the prompt, reasoning out of the completion.
    ///
    /// # Errors
    /// [`UsageObjectError`] when cached tokens exceed the prompt, reasoning exceeds the
    /// completion, or the total is below prompt plus completion.
    pub fn token_counts(&self) -> Result<TokenCounts, UsageObjectError> {
        let provider = Provider::OpenAi;
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        let reasoning = self
            .completion_tokens_details
            .as_ref()
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0);
        let counts = TokenCounts {
            input: part_of(
                provider,
                ("cached_tokens", cached),
                ("prompt_tokens", self.prompt_tokens),
            )?,
            cached_input: cached,
            cache_write: 0,
            output: part_of(
                provider,
                ("reasoning_tokens", reasoning),
                ("completion_tokens", self.completion_tokens),
            )?,
            reasoning,
        };
        total_covers(provider, counts, self.total_tokens.map(|t| ("total_tokens", t)))
    }
}

/// Anthropic's Messages `usage`. Counts the object leaves out are `None`: a stream's
/// `message_start` and `message_delta` carry different ones, and
/// [`updated_by`](Self::updated_by) combines them.
///
/// # Example
/// ```
/// use token_billing::{AnthropicUsage, TokenCounts};
///
/// let usage: AnthropicUsage = serde_json::from_str(r#"{
///     "input_tokens": 21, "cache_creation_input_tokens": 188, "cache_read_input_tokens": 5000,
///     "output_tokens": 393
/// }"#)?;
/// assert_eq!(
///     usage.token_counts()?,
///     TokenCounts { input: 21, cached_input: 5000, cache_write: 188, output: 393, reasoning: 0 }
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnthropicUsage {
    /// Input tokens after the last cache breakpoint: cache reads and writes excluded.
    #[serde(default)]
    pub input_tokens: Option<u64>,
    /// Input tokens written to the cache.
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
    /// Input tokens read from the cache.
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
    /// Output tokens, extended thinking included.
    #[serde(default)]
    pub output_tokens: Option<u64>,
    /// The cache writes by lifetime, part of `cache_creation_input_tokens`.
    #[serde(default)]
    pub cache_creation: Option<AnthropicCacheCreation>,
}

/// Anthropic's `cache_creation`: cache writes by lifetime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnthropicCacheCreation {
    /// Written for five minutes.
    #[serde(default)]
    pub ephemeral_5m_input_tokens: u64,
    /// Written for an hour.
    #[serde(default)]
    pub ephemeral_1h_input_tokens: u64,
}

impl AnthropicUsage {
    /// The usage after a later report of the same message: a stream's `message_delta` usage is
    /// cumulative, so every count it gives replaces this one's, and the counts it leaves out
    /// (the input counts, in older streams) stay as `message_start` gave them.
    ///
    /// # Example
    /// ```
    /// use token_billing::AnthropicUsage;
    ///
    /// let start: AnthropicUsage = serde_json::from_str(r#"{"input_tokens": 472, "output_tokens": 2}"#)?;
    /// let delta: AnthropicUsage = serde_json::from_str(r#"{"output_tokens": 503}"#)?;
    /// let counts = start.updated_by(&delta).token_counts()?;
    /// assert_eq!((counts.input, counts.output), (472, 503));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn updated_by(&self, later: &AnthropicUsage) -> AnthropicUsage {
        AnthropicUsage {
            input_tokens: later.input_tokens.or(self.input_tokens),
            cache_creation_input_tokens: later.cache_creation_input_tokens.or(self.cache_creation_input_tokens),
            cache_read_input_tokens: later.cache_read_input_tokens.or(self.cache_read_input_tokens),
            output_tokens: later.output_tokens.or(self.output_tokens),
            cache_creation: later.cache_creation.clone().or_else(|| self.cache_creation.clone()),
        }
    }

    /// The disjoint counts: Anthropic's fields are disjoint already.
    ///
    /// # Errors
    /// [`UsageObjectError::Missing`] without `input_tokens` or `output_tokens` (an older
    /// stream's `message_delta` alone gives only the output: combine it with `message_start`'s
    /// usage by [`updated_by`](Self::updated_by)); [`UsageObjectError::PartLargerThanWhole`]
    /// when the writes by lifetime add up to more than `cache_creation_input_tokens`.
    pub fn token_counts(&self) -> Result<TokenCounts, UsageObjectError> {
        let provider = Provider::Anthropic;
        for (field, count) in [
            ("input_tokens", self.input_tokens),
            ("output_tokens", self.output_tokens),
        ] {
            if count.is_none() {
                return Err(UsageObjectError::Missing { provider, field });
            }
        }
        let cache_write = self.cache_creation_input_tokens.unwrap_or(0);
        if let Some(lifetimes) = &self.cache_creation {
            let by_lifetime = lifetimes
                .ephemeral_5m_input_tokens
                .checked_add(lifetimes.ephemeral_1h_input_tokens)
                .ok_or(UsageObjectError::Overflow { provider })?;
            part_of(
                provider,
                ("cache_creation's tokens by lifetime", by_lifetime),
                ("cache_creation_input_tokens", cache_write),
            )?;
        }
        let counts = TokenCounts {
            input: self.input_tokens.unwrap_or(0),
            cached_input: self.cache_read_input_tokens.unwrap_or(0),
            cache_write,
            output: self.output_tokens.unwrap_or(0),
            reasoning: 0,
        };
        total_covers(provider, counts, None)
    }
}

/// Gemini's `usageMetadata`. Counts it leaves out are zero.
///
/// # Example
/// ```
/// use token_billing::{GeminiUsage, TokenCounts};
///
/// let usage: GeminiUsage = serde_json::from_str(r#"{
///     "promptTokenCount": 12000, "cachedContentTokenCount": 10000, "candidatesTokenCount": 400,
///     "thoughtsTokenCount": 1200, "totalTokenCount": 13600
/// }"#)?;
/// assert_eq!(
///     usage.token_counts()?,
///     TokenCounts { input: 2000, cached_input: 10000, cache_write: 0, output: 400, reasoning: 1200 }
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GeminiUsage {
    /// Prompt tokens, cached content included.
    #[serde(default)]
    pub prompt_token_count: u64,
    /// Prompt tokens served from the context cache, part of `promptTokenCount`.
    #[serde(default)]
    pub cached_content_token_count: u64,
    /// Tokens of the response candidates, thoughts excluded.
    #[serde(default)]
    pub candidates_token_count: u64,
    /// Thinking tokens.
    #[serde(default)]
    pub thoughts_token_count: u64,
    /// Tokens of tool-use prompts, apart from `promptTokenCount`: billed as input.
    #[serde(default)]
    pub tool_use_prompt_token_count: u64,
    /// The reported total, when there is one.
    #[serde(default)]
    pub total_token_count: Option<u64>,
}

impl GeminiUsage {
    /// The disjoint counts: cached content taken out of the prompt, tool-use prompts added to
    /// the input.
    ///
    /// # Errors
    /// [`UsageObjectError`] when the cached content exceeds the prompt or the total is below
    /// the sum of the counts.
    pub fn token_counts(&self) -> Result<TokenCounts, UsageObjectError> {
        let provider = Provider::Gemini;
        let fresh = part_of(
            provider,
            ("cachedContentTokenCount", self.cached_content_token_count),
            ("promptTokenCount", self.prompt_token_count),
        )?;
        let counts = TokenCounts {
            input: fresh
                .checked_add(self.tool_use_prompt_token_count)
                .ok_or(UsageObjectError::Overflow { provider })?,
            cached_input: self.cached_content_token_count,
            cache_write: 0,
            output: self.candidates_token_count,
            reasoning: self.thoughts_token_count,
        };
        total_covers(provider, counts, self.total_token_count.map(|t| ("totalTokenCount", t)))
    }
}
