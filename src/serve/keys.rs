//! API keys (SPEC §8): what a key is, how its secret is made and checked. Pure: the
//! keys live in a compacted topic ([`super::key_table`]), this file knows nothing of it.
//!
//! A secret is `pk_<id>_<64 hex digits>`: 256 random bits, named by its key id so a
//! check is one lookup. Only a salted SHA-256 of it is stored. A slow hash (bcrypt,
//! argon2) protects secrets people choose; a random 256-bit secret cannot be guessed
//! from its hash, and a fast hash keeps the check off the request's latency budget
//! (a thousand requests a second). The comparison is constant-time.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The stored form of a key: everything but its secret. A revoked key stays in the
/// topic (with `revoked_at`) so `pulses keys list` can show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    /// The tenant the key acts for; None for an admin key.
    pub tenant_id: Option<String>,
    pub admin: bool,
    pub name: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// Hex of the random salt and of SHA-256(salt ‖ secret).
    salt: String,
    hash: String,
}

/// A key just created, with the secret its owner is shown once.
#[derive(Debug, Serialize)]
pub struct NewKey {
    pub id: String,
    pub tenant_id: Option<String>,
    pub admin: bool,
    pub name: Option<String>,
    pub secret: String,
}

/// Who a request acts for, once its key checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin { key_id: String },
    Tenant { key_id: String, tenant_id: String },
}

impl Caller {
    /// Whether this caller may act for `tenant`.
    pub fn may_act_for(&self, tenant: &str) -> bool {
        match self {
            Self::Admin { .. } => true,
            Self::Tenant { tenant_id, .. } => tenant_id == tenant,
        }
    }
}

const SECRET_PREFIX: &str = "pk_";

/// Why a key was refused (every case answers 401; the reason goes to the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefused {
    #[error("no X-API-Key header")]
    Missing,
    #[error("not a pulses API key")]
    Malformed,
    #[error("unknown key id")]
    Unknown,
    #[error("key revoked")]
    Revoked,
    #[error("wrong secret")]
    WrongSecret,
}

impl ApiKey {
    /// A new key for `tenant_id` (or an admin key), with its secret.
    pub fn create(tenant_id: Option<String>, admin: bool, name: Option<String>, now_rfc3339: String) -> (ApiKey, NewKey) {
        let mut rng = rand::rngs::OsRng;
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        let mut salt = [0u8; 16];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        rng.fill_bytes(&mut salt);
        let id = hex(&id);
        let secret = format!("{SECRET_PREFIX}{id}_{}", hex(&secret));
        let key = ApiKey {
            id: id.clone(),
            tenant_id: tenant_id.clone(),
            admin,
            name: name.clone(),
            created_at: now_rfc3339,
            revoked_at: None,
            hash: hex(&digest(&salt, &secret)),
            salt: hex(&salt),
        };
        (key, NewKey { id, tenant_id, admin, name, secret })
    }

    /// Whether `secret` is this key's, compared in constant time.
    pub fn matches(&self, secret: &str) -> bool {
        let (Some(salt), Some(hash)) = (unhex(&self.salt), unhex(&self.hash)) else { return false };
        digest(&salt, secret).ct_eq(&hash).into()
    }

    /// What `pulses keys list` shows of it: everything but the salt and hash.
    pub fn listed(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "tenant_id": self.tenant_id, "admin": self.admin, "name": self.name,
            "created_at": self.created_at, "revoked_at": self.revoked_at,
        })
    }

    /// Who this key acts for.
    pub fn caller(&self) -> Caller {
        match (&self.tenant_id, self.admin) {
            (Some(tenant_id), false) => Caller::Tenant { key_id: self.id.clone(), tenant_id: tenant_id.clone() },
            _ => Caller::Admin { key_id: self.id.clone() },
        }
    }
}

/// The key id a secret names, if it has the form of one.
pub fn key_id_of(secret: &str) -> Result<&str, KeyRefused> {
    let rest = secret.strip_prefix(SECRET_PREFIX).ok_or(KeyRefused::Malformed)?;
    let (id, random) = rest.split_once('_').ok_or(KeyRefused::Malformed)?;
    let hexdigits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if hexdigits(id, 16) && hexdigits(random, 64) {
        Ok(id)
    } else {
        Err(KeyRefused::Malformed)
    }
}

/// Checks `secret` against the key it names, as `lookup` finds it.
pub fn authenticate(secret: Option<&str>, lookup: impl FnOnce(&str) -> Option<ApiKey>) -> Result<Caller, KeyRefused> {
    let secret = secret.ok_or(KeyRefused::Missing)?;
    let key = lookup(key_id_of(secret)?).ok_or(KeyRefused::Unknown)?;
    if key.revoked_at.is_some() {
        return Err(KeyRefused::Revoked);
    }
    if !key.matches(secret) {
        return Err(KeyRefused::WrongSecret);
    }
    Ok(key.caller())
}

fn digest(salt: &[u8], secret: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant_key() -> (ApiKey, NewKey) {
        ApiKey::create(Some("acme".into()), false, Some("ci".into()), "2026-12-03T12:00:00Z".into())
    }

    #[test]
    fn a_created_secret_checks_out_and_names_its_key() {
        let (key, new) = tenant_key();
        assert_eq!(key_id_of(&new.secret), Ok(key.id.as_str()));
        let caller = authenticate(Some(&new.secret), |id| (id == key.id).then(|| key.clone()));
        assert_eq!(caller, Ok(Caller::Tenant { key_id: key.id.clone(), tenant_id: "acme".into() }));
        assert!(caller.unwrap().may_act_for("acme"));
    }

    #[test]
    fn the_stored_key_holds_no_secret() {
        let (key, new) = tenant_key();
        let stored = serde_json::to_string(&key).unwrap();
        let random = new.secret.rsplit('_').next().unwrap();
        assert!(!stored.contains(random), "{stored}");
        let back: ApiKey = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, key);
    }

    #[test]
    fn wrong_unknown_revoked_and_malformed_keys_are_refused() {
        let (key, new) = tenant_key();
        let found = |id: &str| (id == key.id).then(|| key.clone());
        let mut wrong = new.secret.clone();
        let last = if wrong.ends_with('0') { "1" } else { "0" };
        wrong.replace_range(wrong.len() - 1.., last);
        assert_eq!(authenticate(Some(&wrong), found), Err(KeyRefused::WrongSecret));
        let (_, other) = tenant_key();
        assert_eq!(authenticate(Some(&other.secret), found), Err(KeyRefused::Unknown));
        assert_eq!(authenticate(None, found), Err(KeyRefused::Missing));
        for bad in ["", "pk_", "pk_zz_00", "Bearer x", &new.secret[1..]] {
            assert_eq!(authenticate(Some(bad), found), Err(KeyRefused::Malformed), "{bad:?}");
        }
        let revoked = ApiKey { revoked_at: Some("2026-12-03T13:00:00Z".into()), ..key.clone() };
        assert_eq!(authenticate(Some(&new.secret), |_| Some(revoked.clone())), Err(KeyRefused::Revoked));
    }

    #[test]
    fn an_admin_key_acts_for_every_tenant() {
        let (key, new) = ApiKey::create(None, true, None, "2026-12-03T12:00:00Z".into());
        let caller = authenticate(Some(&new.secret), |_| Some(key.clone())).unwrap();
        assert!(caller.may_act_for("acme") && caller.may_act_for("globex"));
        let tenant = tenant_key().0.caller();
        assert!(!tenant.may_act_for("globex"));
    }
}
