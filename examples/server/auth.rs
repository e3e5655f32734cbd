//! Who may call the service: the host's backend with the API key (everything), and a user with
//! an HS256 JWT whose `sub` is their id (their own summary, reports and dashboard).
//!
//! Tokens are checked the way Supabase issues them: header `{"alg":"HS256","typ":"JWT"}`, a
//! signature by the project's JWT secret, `exp` required, `nbf` honoured, and `aud` checked when
//! an audience is configured. Any other algorithm is refused, whatever the header says. Keys
//! and signatures are compared in constant time.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use ring::{digest, hmac};
use serde_json::Value;
use subtle::ConstantTimeEq;

/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECONDS: i64 = 30;

/// The credentials the service accepts.
#[derive(Clone)]
pub(crate) struct Auth {
    api_key_digest: [u8; 32],
    jwt_key: Option<hmac::Key>,
    audience: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("user_tokens", &self.jwt_key.is_some())
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// The host's backend: may do everything.
    Backend,
    /// A user, by their token's `sub`: may read their own data.
    User(String),
}

impl Caller {
    /// Whether the caller may read `user`'s data.
    pub(crate) fn may_read(&self, user: &str) -> bool {
        match self {
            Caller::Backend => true,
            Caller::User(sub) => sub == user,
        }
    }
}

/// Why credentials were refused (answered with 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("missing credentials: send Authorization: Bearer <key or token>")]
    Missing,
    #[error("malformed Authorization header: expected Bearer <key or token>")]
    Malformed,
    #[error("invalid credentials")]
    Invalid,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

impl Auth {
    /// The API key of the host's backend, and optionally the JWT secret of user tokens and the
    /// audience they must name.
    pub(crate) fn new(api_key: &str, jwt_secret: Option<&str>, audience: Option<String>) -> Auth {
        Auth {
            api_key_digest: sha256(api_key.as_bytes()),
            jwt_key: jwt_secret.map(|secret| hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())),
            audience,
        }
    }

    /// Who sent a request with this `Authorization` header, at `now`.
    pub(crate) fn caller(&self, header: Option<&str>, now: DateTime<Utc>) -> Result<Caller, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let (scheme, credential) = header.split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || credential.trim().is_empty() {
            return Err(AuthError::Malformed);
        }
        let credential = credential.trim();
        // Digests of equal length, compared in constant time: the time taken tells nothing of
        // the key, not even its length.
        if bool::from(sha256(credential.as_bytes()).ct_eq(&self.api_key_digest)) {
            return Ok(Caller::Backend);
        }
        match &self.jwt_key {
            Some(key) => self.user_of(key, credential, now),
            None => Err(AuthError::Invalid),
        }
    }

    fn user_of(&self, key: &hmac::Key, token: &str, now: DateTime<Utc>) -> Result<Caller, AuthError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Invalid);
        };
        let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| AuthError::Invalid);
        let json = |part: &str| -> Result<Value, AuthError> {
            serde_json::from_slice(&decode(part)?).map_err(|_| AuthError::Invalid)
        };
        let header_json = json(header)?;
        if header_json.get("alg").and_then(Value::as_str) != Some("HS256") {
            return Err(AuthError::Invalid);
        }
        let signed = &token[..header.len() + 1 + payload.len()];
        hmac::verify(key, signed.as_bytes(), &decode(signature)?).map_err(|_| AuthError::Invalid)?;
        let claims = json(payload)?;
        let now = now.timestamp();
        let exp = claims.get("exp").and_then(Value::as_i64).ok_or(AuthError::Invalid)?;
        if now > exp.saturating_add(LEEWAY_SECONDS) {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf.as_i64().ok_or(AuthError::Invalid)?;
            if now < nbf.saturating_sub(LEEWAY_SECONDS) {
                return Err(AuthError::NotYetValid);
            }
        }
        if let Some(audience) = &self.audience {
            let named = match claims.get("aud") {
                Some(Value::String(aud)) => aud == audience,
                Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience.as_str())),
                _ => false,
            };
            if !named {
                return Err(AuthError::Invalid);
            }
        }
        match claims.get("sub").and_then(Value::as_str) {
            Some(sub) if !sub.is_empty() => Ok(Caller::User(sub.to_owned())),
            _ => Err(AuthError::Invalid),
        }
    }
}

/// Signs an HS256 token with these claims: for tests and local tools, as Supabase would issue
/// it.
#[allow(dead_code)]
pub(crate) fn sign_token(secret: &str, claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(hmac::sign(&key, format!("{header}.{payload}").as_bytes()));
    format!("{header}.{payload}.{signature}")
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(1_795_000_000, 0).single().expect("valid")
    }

    fn auth() -> Auth {
        Auth::new("backend-key", Some("jwt-secret"), Some("authenticated".to_owned()))
    }

    fn token(claims: Value) -> String {
        sign_token("jwt-secret", &claims)
    }

    fn bearer(credential: &str) -> String {
        format!("Bearer {credential}")
    }

    #[test]
    fn the_api_key_is_the_backend() {
        assert_eq!(auth().caller(Some("Bearer backend-key"), now()), Ok(Caller::Backend));
        assert_eq!(auth().caller(Some("bearer backend-key"), now()), Ok(Caller::Backend));
        assert_eq!(
            auth().caller(Some("Bearer backend-kez"), now()),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth().caller(Some("Basic backend-key"), now()),
            Err(AuthError::Malformed)
        );
        assert_eq!(auth().caller(Some("backend-key"), now()), Err(AuthError::Malformed));
        assert_eq!(auth().caller(None, now()), Err(AuthError::Missing));
    }

    #[test]
    fn a_user_token_names_its_user() {
        let valid = token(json!({"sub": "alice", "aud": "authenticated", "exp": 1_795_000_600}));
        assert_eq!(
            auth().caller(Some(&bearer(&valid)), now()),
            Ok(Caller::User("alice".to_owned()))
        );
    }

    #[test]
    fn bad_tokens_are_refused() {
        let exp = 1_795_000_600;
        let cases = [
            (
                token(json!({"sub": "alice", "aud": "authenticated", "exp": 1_794_999_000})),
                AuthError::Expired,
            ),
            (
                token(json!({"sub": "alice", "aud": "authenticated", "exp": exp, "nbf": 1_795_001_000})),
                AuthError::NotYetValid,
            ),
            (
                token(json!({"sub": "alice", "aud": "authenticated"})),
                AuthError::Invalid,
            ),
            (
                token(json!({"sub": "alice", "aud": "anon", "exp": exp})),
                AuthError::Invalid,
            ),
            (token(json!({"aud": "authenticated", "exp": exp})), AuthError::Invalid),
            (
                sign_token(
                    "other-secret",
                    &json!({"sub": "alice", "aud": "authenticated", "exp": exp}),
                ),
                AuthError::Invalid,
            ),
            ("a.b.c".to_owned(), AuthError::Invalid),
        ];
        for (token, error) in cases {
            assert_eq!(auth().caller(Some(&bearer(&token)), now()), Err(error), "{token}");
        }
        // The algorithm is never taken from the token.
        let claims = URL_SAFE_NO_PAD.encode(json!({"sub": "alice", "aud": "authenticated", "exp": exp}).to_string());
        let none = format!("{}.{claims}.", URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#));
        assert_eq!(auth().caller(Some(&bearer(&none)), now()), Err(AuthError::Invalid));
        // A tampered payload breaks the signature.
        let valid = token(json!({"sub": "alice", "aud": "authenticated", "exp": exp}));
        let mut parts: Vec<&str> = valid.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(json!({"sub": "bob", "aud": "authenticated", "exp": exp}).to_string());
        parts[1] = &forged;
        assert_eq!(
            auth().caller(Some(&bearer(&parts.join("."))), now()),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn without_a_jwt_secret_only_the_key_is_accepted() {
        let auth = Auth::new("backend-key", None, None);
        let valid = token(json!({"sub": "alice", "exp": 1_795_000_600}));
        assert_eq!(auth.caller(Some(&bearer(&valid)), now()), Err(AuthError::Invalid));
    }
}
