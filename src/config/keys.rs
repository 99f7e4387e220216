//! Secrets and keys: the masked [`Secret`] type for tokens and passwords, and
//! the JWT verification key, loaded and checked once at start. The
//! configured key fixes the algorithm family: an HS256 secret accepts only
//! HMAC tokens, a public key only its own RSA or EC algorithms, so
//! `alg: none` and HS/RS confusion (an HMAC token signed with the public key
//! as its secret) are refused.

use std::fmt;
use std::str::FromStr;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::channel::Channel;

/// A value that must never reach a log line: tokens, passwords, secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error(transparent)]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("missing or empty user claim {0:?}")]
    EmptySubject(String),
}

#[derive(Clone)]
pub struct JwtKey {
    key: DecodingKey,
    validation: Validation,
    kind: &'static str,
    /// The claim that names the user (`sub`, or e.g. Open WebUI's `id`).
    user_claim: String,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwtKey({}, ***)", self.kind)
    }
}

/// The claims wsrelay reads. `exp` and the user claim are required.
#[derive(Debug)]
pub struct Claims {
    /// The user: the `--jwt-user-claim` claim (a string, or a number).
    pub user: String,
    /// Checked by the validation; kept so the session can close at expiry.
    pub exp: u64,
    pub channels: Vec<Channel>,
    pub info: Option<serde_json::Value>,
}

/// The claims as they come: the user claim is any of the others.
#[derive(Deserialize)]
struct RawClaims {
    exp: u64,
    #[serde(default)]
    channels: Vec<Channel>,
    #[serde(default)]
    info: Option<serde_json::Value>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

fn validation(algs: &[Algorithm]) -> Validation {
    let mut v = Validation::new(algs[0]);
    v.algorithms = algs.to_vec();
    v.leeway = 5;
    v.validate_nbf = true;
    // Checked only when --jwt-audience is set (identity providers put an
    // `aud` in nearly every token; refusing them all would be useless).
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp"]);
    v
}

impl JwtKey {
    pub fn hs256(secret: &Secret) -> Self {
        JwtKey {
            key: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation: validation(&[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]),
            kind: "HMAC",
            user_claim: "sub".to_owned(),
        }
    }

    /// An RSA (RS256/384/512) or EC (ES256/384) public key in PEM.
    pub fn from_public_pem(pem: &[u8]) -> Result<Self, &'static str> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(JwtKey {
                key,
                validation: validation(&[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512]),
                kind: "RSA",
                user_claim: "sub".to_owned(),
            });
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(JwtKey {
                key,
                validation: validation(&[Algorithm::ES256, Algorithm::ES384]),
                kind: "EC",
                user_claim: "sub".to_owned(),
            });
        }
        Err("not a PEM RSA or EC public key")
    }

    /// Requires `aud` / `iss` to be one of these (when not empty).
    pub fn with_claims(mut self, audience: &[String], issuer: &[String]) -> Self {
        if !audience.is_empty() {
            self.validation.set_audience(audience);
            self.validation.validate_aud = true;
        }
        if !issuer.is_empty() {
            self.validation.set_issuer(issuer);
        }
        self
    }

    /// Takes the user from `claim` instead of `sub`.
    pub fn with_user_claim(mut self, claim: &str) -> Self {
        claim.clone_into(&mut self.user_claim);
        self
    }

    /// Allows `leeway` of clock skew on `exp` and `nbf`.
    pub fn with_leeway(mut self, leeway: std::time::Duration) -> Self {
        self.validation.leeway = leeway.as_secs();
        self
    }

    /// The allowed clock skew, in seconds.
    pub fn leeway(&self) -> u64 {
        self.validation.leeway
    }

    /// Verifies signature, algorithm, expiry (and `nbf`, `aud`, `iss` as
    /// configured); returns the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        let raw = jsonwebtoken::decode::<RawClaims>(token, &self.key, &self.validation)?.claims;
        let user = match raw.other.get(&self.user_claim) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err(JwtError::EmptySubject(self.user_claim.clone())),
        };
        Ok(Claims { user, exp: raw.exp, channels: raw.channels, info: raw.info })
    }
}
