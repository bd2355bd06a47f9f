//! Who is calling: the admin (the admin token) or one account (one of its keys). Secrets are
//! compared by their SHA-256 digests and never logged.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
pub use tollgate_store::hash_secret;

use crate::AppState;
use crate::error::ApiError;

/// The admin token, kept only as its digest.
#[derive(Clone)]
pub struct AdminToken {
    digest: String,
}

impl AdminToken {
    pub fn from_secret(secret: &str) -> AdminToken {
        AdminToken { digest: hash_secret(secret) }
    }

    /// The token's SHA-256 (hex), for other routes that check it (`/metrics`).
    pub fn digest(&self) -> &str {
        &self.digest
    }

    fn matches(&self, digest: &str) -> bool {
        // Digests of equal length: compare every byte so timing reveals nothing.
        self.digest.len() == digest.len()
            && self.digest.bytes().zip(digest.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin,
    /// A key of this account.
    Account {
        account: String,
        key_id: String,
    },
}

impl Caller {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Account { .. } => Err(ApiError::Forbidden(
                "this needs the admin token; account keys may only read \
                 their own account, post its events and manage its holds"
                    .into(),
            )),
        }
    }

    /// Admin, or a key of `account`. Another account's key gets the same 404 as a missing
    /// account, so it learns nothing about other accounts.
    pub fn require_account(&self, account: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Account { account: own, .. } if own == account => Ok(()),
            Caller::Account { .. } => Err(ApiError::NotFound(format!("account {account:?} not found"))),
        }
    }
}

/// The credential of a request: `Authorization: Bearer …`, else `x-api-key`.
pub fn credential(parts: &Parts) -> Option<&str> {
    let bearer = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    bearer.or_else(|| parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let secret = credential(parts).filter(|s| !s.is_empty()).ok_or_else(|| {
            ApiError::Unauthorized("missing credential: send Authorization: Bearer <admin token or account key>".into())
        })?;
        let digest = hash_secret(secret);
        if state.admin.matches(&digest) {
            return Ok(Caller::Admin);
        }
        match state.store.key_by_hash(&digest).await? {
            Some(key) if key.revoked_at.is_none() => Ok(Caller::Account { account: key.account, key_id: key.id }),
            Some(_) => Err(ApiError::Unauthorized("this key has been revoked".into())),
            None => Err(ApiError::Unauthorized("unknown credential: not the admin token nor a tollgate key".into())),
        }
    }
}
