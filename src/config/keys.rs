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
    #[error("empty sub")]
    EmptySubject,
}

#[derive(Clone)]
pub struct JwtKey {
    key: DecodingKey,
    validation: Validation,
    kind: &'static str,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwtKey({}, ***)", self.kind)
    }
}

/// The claims wsrelay reads. `exp` and `sub` are required.
#[derive(Debug, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Checked by the validation; kept so the session can close at expiry.
    pub exp: u64,
    #[serde(default)]
    pub channels: Vec<Channel>,
    #[serde(default)]
    pub info: Option<serde_json::Value>,
}

fn validation(algs: &[Algorithm]) -> Validation {
    let mut v = Validation::new(algs[0]);
    v.algorithms = algs.to_vec();
    v.leeway = 5;
    v.validate_nbf = true;
    // Checked only when --jwt-audience is set (identity providers put an
    // `aud` in nearly every token; refusing them all would be useless).
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "sub"]);
    v
}

impl JwtKey {
    pub fn hs256(secret: &Secret) -> Self {
        JwtKey {
            key: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation: validation(&[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]),
            kind: "HMAC",
        }
    }

    /// An RSA (RS256/384/512) or EC (ES256/384) public key in PEM.
    pub fn from_public_pem(pem: &[u8]) -> Result<Self, &'static str> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(JwtKey {
                key,
                validation: validation(&[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512]),
                kind: "RSA",
            });
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(JwtKey { key, validation: validation(&[Algorithm::ES256, Algorithm::ES384]), kind: "EC" });
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
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?.claims;
        if claims.sub.is_empty() {
            return Err(JwtError::EmptySubject);
        }
        Ok(claims)
    }
}
