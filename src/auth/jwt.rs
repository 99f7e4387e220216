//! JWT verification with the `jsonwebtoken` crate. The configured key fixes
//! the algorithm family: an HS256 secret accepts only HMAC tokens, a public
//! key only its own RSA or EC algorithms, so `alg: none` and HS/RS confusion
//! (an HMAC token signed with the public key as its secret) are refused.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Secret;

#[derive(Clone)]
pub struct JwtKey {
    key: DecodingKey,
    validation: Validation,
    kind: &'static str,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtKey({}, ***)", self.kind)
    }
}

/// The claims wsrelay reads. `exp` is required.
#[derive(Debug, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub channels: Vec<String>,
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
    pub fn from_public_pem(pem: &[u8]) -> Result<Self, String> {
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
        Err("not a PEM RSA or EC public key".into())
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

    /// Verifies signature, algorithm, expiry (and `nbf`, `aud`, `iss` as
    /// configured); returns the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| e.to_string())?;
        if claims.sub.is_empty() {
            return Err("empty sub".into());
        }
        if let Some(bad) = claims.channels.iter().find(|c| crate::protocol::validate_channel(c).is_err()) {
            return Err(format!("invalid channel name in claims: {bad:?}"));
        }
        Ok(claims)
    }
}
