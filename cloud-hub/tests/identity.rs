//! Integration tests of hub identity: key files, join tokens, the registry and its signed
//! snapshots, and the `cloud-hub` CLI end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cloud_hub::keys::{self, KeyError};
use cloud_hub::registry::{
    JsonFileStore, MemoryStore, PeerRefused, Registry, RegistryError, RegistryReplica,
    SignedRegistry, SnapshotError,
};
use cloud_hub::tokens::{self, TokenError, TokenRequest};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use schemas::identity::EndpointKey;
use schemas::ids::Role;
use schemas::time::Timestamp;

const T0: Timestamp = Timestamp(1_790_000_000_000);
const HOUR: i64 = 3_600_000;

fn hub() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

fn node(n: u8) -> EndpointKey {
    keys::endpoint_key(&SigningKey::from_bytes(&[n.wrapping_add(100); 32]))
}

fn req(tenant: &str, site: &str, role: Role) -> TokenRequest {
    TokenRequest {
        tenant: tenant.parse().unwrap(),
        site: site.parse().unwrap(),
        role,
        ttl_ms: HOUR,
    }
}

fn token(key: &SigningKey) -> String {
    tokens::issue(key, &req("acme", "store-1", Role::Edge), T0)
        .unwrap()
        .0
}

fn mem_registry() -> Registry<MemoryStore> {
    Registry::open(MemoryStore::default(), hub()).unwrap()
}

// ---------------------------------------------------------------- keys

#[test]
fn key_file_is_created_0600_with_parents_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep/er/hub.key");
    let (k, created) = keys::load_or_create(&path).unwrap();
    assert!(created);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    let (k2, created) = keys::load_or_create(&path).unwrap();
    assert!(!created);
    assert_eq!(k.to_bytes(), k2.to_bytes());
}

#[test]
fn group_readable_key_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.key");
    keys::create(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = keys::load(&path).unwrap_err();
    assert!(
        matches!(err, KeyError::InsecurePermissions { mode: 0o644, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("chmod 600"), "{msg}");
    // load_or_create must not silently replace it either.
    assert!(keys::load_or_create(&path).is_err());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(keys::load(&path).is_ok());
}

#[test]
fn truncated_or_corrupt_key_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let short = write("short.key", &[7; 17]);
    let err = keys::load(&short).unwrap_err();
    assert!(
        matches!(err, KeyError::WrongLength { len: 17, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");
    let empty = write("empty.key", &[]);
    assert!(matches!(
        keys::load(&empty),
        Err(KeyError::WrongLength { len: 0, .. })
    ));
    let zero = write("zero.key", &[0; 32]);
    assert!(matches!(keys::load(&zero), Err(KeyError::AllZero { .. })));
    // load_or_create must not overwrite a damaged identity.
    assert!(keys::load_or_create(&short).is_err());
    assert_eq!(std::fs::read(&short).unwrap(), vec![7; 17]);
}

// ---------------------------------------------------------------- tokens

#[test]
fn token_verifies_and_enrols_once() {
    let mut reg = mem_registry();
    let t = token(&hub());
    assert!(t.starts_with("fsj1.") && !t.contains(char::is_whitespace));
    let rec = reg.enrol(&t, node(1), T0.saturating_add_ms(1000)).unwrap();
    assert_eq!(rec.role, Role::Edge);
    assert_eq!(rec.tenant.as_ref().unwrap().as_str(), "acme");
    assert_eq!(rec.site.as_ref().unwrap().as_str(), "store-1");
    assert_eq!(reg.lookup(&node(1)), Some(&rec));

    // Second use, by another node: refused naming the first user.
    let err = reg
        .enrol(&t, node(2), T0.saturating_add_ms(2000))
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Token(TokenError::AlreadyUsed { endpoint, .. }) if endpoint == node(1)),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with(&format!("token already used by {}", node(1))),
        "{err}"
    );
    assert!(reg.lookup(&node(2)).is_none());
}

#[test]
fn expired_token_is_refused_with_its_expiry() {
    let mut reg = mem_registry();
    let t = token(&hub());
    let late = T0.saturating_add_ms(HOUR);
    let err = reg.enrol(&t, node(1), late).unwrap_err();
    assert!(
        matches!(err, RegistryError::Token(TokenError::Expired { expires_at, .. }) if expires_at == late),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with(&format!("token expired at {late}")),
        "{err}"
    );
    // One millisecond earlier it is fine.
    assert!(reg.enrol(&t, node(1), Timestamp(late.0 - 1)).is_ok());
}

#[test]
fn token_from_the_future_is_refused() {
    let t = tokens::issue(
        &hub(),
        &req("acme", "s", Role::Edge),
        T0.saturating_add_ms(HOUR),
    )
    .unwrap()
    .0;
    let err = tokens::verify(&t, &hub().verifying_key(), T0).unwrap_err();
    assert!(matches!(err, TokenError::NotYetValid { .. }), "{err:?}");
}

#[test]
fn token_of_another_hub_is_refused() {
    let other = SigningKey::from_bytes(&[2; 32]);
    let mut reg = mem_registry();
    let err = reg.enrol(&token(&other), node(1), T0).unwrap_err();
    assert!(
        matches!(err, RegistryError::Token(TokenError::BadSignature { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("signature does not verify: forged or from another hub"),
        "{err}"
    );
}

/// Re-encode the claims part of a token after editing its JSON, keeping the signature.
fn edit_claims(token: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut v: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    edit(&mut v);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

type Edit = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn edited_claims_are_refused() {
    let t = token(&hub());
    let edits: Vec<Edit> = vec![
        Box::new(|v| v["tenant"] = "evil".into()),
        Box::new(|v| v["site"] = "store-2".into()),
        Box::new(|v| v["role"] = "operator".into()),
        Box::new(|v| v["expires_at"] = (T0.0 + 1000 * HOUR).into()),
        Box::new(|v| v["nonce"] = "00".into()),
    ];
    for edit in edits {
        let forged = edit_claims(&t, edit);
        assert_ne!(forged, t);
        let err = tokens::verify(&forged, &hub().verifying_key(), T0).unwrap_err();
        assert!(matches!(err, TokenError::BadSignature { .. }), "{err:?}");
    }
    // Claiming this hub as issuer while signed by another key is still refused.
    let other = SigningKey::from_bytes(&[2; 32]);
    let hub_id = keys::endpoint_key(&hub()).to_string();
    let forged = edit_claims(&token(&other), |v| v["issuer"] = hub_id.clone().into());
    let err = tokens::verify(&forged, &hub().verifying_key(), T0).unwrap_err();
    assert!(matches!(err, TokenError::BadSignature { .. }), "{err:?}");
}

#[test]
fn malformed_tokens_are_refused_with_a_reason() {
    let good = token(&hub());
    let parts: Vec<&str> = good.split('.').collect();
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        ("hello".into(), "does not start with"),
        (good.replacen("fsj1", "fsj2", 1), "does not start with"),
        (
            format!("fsj1.{}", parts[1]),
            "expected 3 dot-separated parts",
        ),
        (format!("{good}.x"), "expected 3 dot-separated parts"),
        (format!("fsj1.!!!.{}", parts[2]), "claims are not base64url"),
        (
            format!("fsj1.{}.***", parts[1]),
            "signature is not base64url",
        ),
        (
            format!("fsj1.{}.{}", parts[1], &parts[2][..40]),
            "signature is 30 bytes",
        ),
        (
            format!("fsj1.{}.{}", URL_SAFE_NO_PAD.encode(b"{}"), parts[2]),
            "claims do not decode",
        ),
        ("x".repeat(5000), "longer than"),
    ];
    for (input, want) in cases {
        let err = tokens::verify(&input, &hub().verifying_key(), T0).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, TokenError::Malformed { .. }) && msg.starts_with("malformed token: "),
            "{input:?}: {err:?}"
        );
        assert!(msg.contains(want), "{input:?}: {msg} (wanted {want:?})");
    }
    // A tenant id that breaks the id rules is malformed too, not a panic.
    let bad_tenant = edit_claims(&good, |v| v["tenant"] = "Not A Tenant".into());
    assert!(matches!(
        tokens::verify(&bad_tenant, &hub().verifying_key(), T0),
        Err(TokenError::Malformed { .. })
    ));
    // Surrounding whitespace from a copy-paste is fine.
    assert!(tokens::verify(&format!("  {good}\n"), &hub().verifying_key(), T0).is_ok());
}

#[test]
fn only_edge_and_operator_tokens_are_issued() {
    for role in [Role::Hub, Role::Admin, Role::Analyst] {
        let err = tokens::issue(&hub(), &req("a", "b", role), T0).unwrap_err();
        assert_eq!(err, TokenError::RoleNotAllowed { role });
    }
    assert!(tokens::issue(&hub(), &req("a", "b", Role::Operator), T0).is_ok());
    let mut r = req("a", "b", Role::Edge);
    r.ttl_ms = 31 * 24 * HOUR;
    assert!(matches!(
        tokens::issue(&hub(), &r, T0),
        Err(TokenError::BadTtl { .. })
    ));
}

// ---------------------------------------------------------------- registry

#[test]
fn enrol_revoke_and_persist_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.json");
    let t1 = token(&hub());
    let t2 = token(&hub());
    {
        let mut reg = Registry::open(JsonFileStore::new(&file), hub()).unwrap();
        reg.enrol(&t1, node(1), T0).unwrap();
        reg.enrol(&t2, node(2), T0).unwrap();
        assert_eq!(reg.seq(), 2);
        let rec = reg
            .revoke(&node(1), "stolen box", T0.saturating_add_ms(5))
            .unwrap();
        assert_eq!(rec.revoked_reason.as_deref(), Some("stolen box"));
        assert_eq!(reg.seq(), 3);
    }
    let mut reg = Registry::open(JsonFileStore::new(&file), hub()).unwrap();
    assert_eq!(reg.seq(), 3);
    assert_eq!(reg.list().count(), 2);
    let r1 = reg.lookup(&node(1)).unwrap();
    assert!(r1.is_revoked());
    assert_eq!(r1.revoked_at, Some(T0.saturating_add_ms(5)));
    assert!(!reg.lookup(&node(2)).unwrap().is_revoked());
    assert!(matches!(
        reg.check_peer(&node(1)),
        Err(PeerRefused::Revoked { .. })
    ));
    assert_eq!(reg.check_peer(&node(2)).unwrap().endpoint_id, node(2));
    assert!(matches!(
        reg.check_peer(&node(8)),
        Err(PeerRefused::Unknown { seq: 3, .. })
    ));

    // Used nonces survive the restart.
    let err = reg.enrol(&t1, node(3), T0).unwrap_err();
    assert!(
        matches!(err, RegistryError::Token(TokenError::AlreadyUsed { .. })),
        "{err:?}"
    );
    // A revoked key cannot come back with a fresh token.
    let err = reg.enrol(&token(&hub()), node(1), T0).unwrap_err();
    assert!(matches!(err, RegistryError::Revoked { .. }), "{err:?}");
    // An enrolled key cannot enrol twice.
    let err = reg.enrol(&token(&hub()), node(2), T0).unwrap_err();
    assert!(
        matches!(err, RegistryError::AlreadyEnrolled { .. }),
        "{err:?}"
    );
    // Revoking twice names the first revocation; unknown and reasonless are refused.
    assert!(matches!(
        reg.revoke(&node(1), "again", T0),
        Err(RegistryError::Revoked { .. })
    ));
    assert!(matches!(
        reg.revoke(&node(9), "who", T0),
        Err(RegistryError::NotEnrolled { .. })
    ));
    assert!(matches!(
        reg.revoke(&node(2), "  ", T0),
        Err(RegistryError::MissingReason)
    ));
    assert_eq!(reg.seq(), 3, "refusals must not change the registry");
    // The hub's own key cannot enrol.
    assert!(matches!(
        reg.enrol(&token(&hub()), keys::endpoint_key(&hub()), T0),
        Err(RegistryError::HubKey { .. })
    ));
}

#[test]
fn corrupt_registry_file_is_refused_not_reset() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.json");
    std::fs::write(&file, b"{\"seq\": 3, \"records\": ").unwrap();
    let err = Registry::open(JsonFileStore::new(&file), hub()).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"{\"seq\": 3, \"records\": ".to_vec()
    );
}

#[test]
fn failed_write_changes_nothing_and_leaves_the_token_usable() {
    let store = Arc::new(MemoryStore::default());
    let mut reg = Registry::open(store.clone(), hub()).unwrap();
    let t = token(&hub());
    store.fail_writes.store(true, Ordering::SeqCst);
    let err = reg.enrol(&t, node(1), T0).unwrap_err();
    assert!(matches!(err, RegistryError::Store(_)), "{err:?}");
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    assert!(reg.lookup(&node(1)).is_none());
    assert_eq!(reg.seq(), 0);
    store.fail_writes.store(false, Ordering::SeqCst);
    assert!(reg.enrol(&t, node(1), T0).is_ok());
    // What was saved is what the registry holds.
    let reopened = Registry::open(store.clone(), hub()).unwrap();
    assert_eq!(reopened.lookup(&node(1)), reg.lookup(&node(1)));
    assert_eq!(reopened.seq(), 1);
}

#[test]
fn signed_snapshot_verifies_and_replica_refuses_revoked_peers() {
    let mut reg = mem_registry();
    reg.enrol(&token(&hub()), node(1), T0).unwrap();
    reg.enrol(&token(&hub()), node(2), T0).unwrap();
    let before = reg.signed_snapshot();
    reg.revoke(&node(1), "decommissioned", T0).unwrap();
    let after = reg.signed_snapshot();

    let snap = after.verify(&hub().verifying_key()).unwrap();
    assert_eq!(snap.seq, 3);
    assert_eq!(snap.records.len(), 2);
    assert!(snap.lookup(&node(1)).unwrap().is_revoked());

    let mut replica = RegistryReplica::new(hub().verifying_key());
    assert!(matches!(
        replica.check_peer(&node(2)),
        Err(PeerRefused::NoSnapshot { .. })
    ));
    assert_eq!(replica.apply(&before).unwrap(), 2);
    assert!(replica.check_peer(&node(1)).is_ok());
    assert_eq!(replica.apply(&after).unwrap(), 3);
    let err = replica.check_peer(&node(1)).unwrap_err();
    assert!(matches!(err, PeerRefused::Revoked { .. }), "{err:?}");
    assert!(err.to_string().contains("decommissioned"), "{err}");
    assert_eq!(replica.check_peer(&node(2)).unwrap().endpoint_id, node(2));
    assert!(matches!(
        replica.check_peer(&node(7)),
        Err(PeerRefused::Unknown { .. })
    ));
    // Same snapshot again: fine. Older one: refused, and the replica keeps seq 3.
    assert_eq!(replica.apply(&after).unwrap(), 3);
    assert_eq!(
        replica.apply(&before).unwrap_err(),
        SnapshotError::Stale { held: 3, got: 2 }
    );
    assert!(replica.check_peer(&node(1)).is_err());
    // It survives a JSON round trip (how it travels).
    let wire = serde_json::to_string(&after).unwrap();
    let back: SignedRegistry = serde_json::from_str(&wire).unwrap();
    assert!(back.verify(&hub().verifying_key()).is_ok());
}

#[test]
fn forged_snapshots_are_refused() {
    let mut reg = mem_registry();
    reg.enrol(&token(&hub()), node(1), T0).unwrap();
    reg.revoke(&node(1), "stolen", T0).unwrap();
    let genuine = reg.signed_snapshot();
    let hub_vk = hub().verifying_key();

    // Un-revoke by editing the payload.
    let mut edited = genuine.clone();
    let mut v: serde_json::Value = serde_json::from_str(&edited.payload).unwrap();
    v["records"][0]["revoked_at"] = serde_json::Value::Null;
    edited.payload = v.to_string();
    assert_eq!(edited.verify(&hub_vk), Err(SnapshotError::BadSignature));

    // Bump seq to beat the real one.
    let mut bumped = genuine.clone();
    bumped.payload = bumped.payload.replace("\"seq\":2", "\"seq\":99");
    assert_ne!(bumped.payload, genuine.payload);
    assert_eq!(bumped.verify(&hub_vk), Err(SnapshotError::BadSignature));

    // A snapshot from another hub's registry.
    let other = Registry::open(MemoryStore::default(), SigningKey::from_bytes(&[2; 32])).unwrap();
    assert_eq!(
        other.signed_snapshot().verify(&hub_vk),
        Err(SnapshotError::BadSignature)
    );
    // Garbage signature.
    let mut garbage = genuine.clone();
    garbage.signature = "abc".into();
    assert!(matches!(
        garbage.verify(&hub_vk),
        Err(SnapshotError::Malformed { .. })
    ));
    let mut replica = RegistryReplica::new(hub_vk);
    assert!(replica.apply(&edited).is_err());
    assert_eq!(replica.seq(), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn token_for_tsr_enrols_exactly_tsr(
        tenant in "[a-z0-9][a-z0-9_-]{0,20}",
        site in "[a-z0-9][a-z0-9_-]{0,20}",
        operator in any::<bool>(),
        ttl_s in 1i64..86_400,
        node_seed in any::<[u8; 32]>(),
    ) {
        let role = if operator { Role::Operator } else { Role::Edge };
        let mut reg = mem_registry();
        let r = TokenRequest {
            tenant: tenant.parse().unwrap(),
            site: site.parse().unwrap(),
            role,
            ttl_ms: ttl_s * 1000,
        };
        let (t, claims) = tokens::issue(&hub(), &r, T0).unwrap();
        let ep = keys::endpoint_key(&SigningKey::from_bytes(&node_seed));
        prop_assume!(ep != keys::endpoint_key(&hub()));
        let rec = reg.enrol(&t, ep, T0.saturating_add_ms(ttl_s * 1000 - 1)).unwrap();
        prop_assert_eq!(rec.tenant.as_ref().map(|t| t.as_str()), Some(tenant.as_str()));
        prop_assert_eq!(rec.site.as_ref().map(|s| s.as_str()), Some(site.as_str()));
        prop_assert_eq!(rec.role, role);
        prop_assert_eq!(rec.endpoint_id, ep);
        prop_assert_eq!(claims.expires_at, T0.saturating_add_ms(ttl_s * 1000));
        prop_assert_eq!(reg.list().count(), 1);
        let snap = reg.signed_snapshot().verify(&hub().verifying_key()).unwrap();
        prop_assert_eq!(snap.lookup(&ep), Some(&rec));
    }
}

// ---------------------------------------------------------------- CLI

fn hub_cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("FIELDSYNC_ACTOR", "cli:test")
        .env_remove("FIELDSYNC_HUB_CONFIG")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn cli_init_token_enrol_revoke_list_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hub");

    // Before init: a clear error, exit 2.
    let o = hub_cli(&dir, &["node", "list"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("run `cloud-hub init"), "{}", stderr(&o));

    let o = hub_cli(&dir, &["init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let hub_id = stdout(&o).trim().to_string();
    let hub_key: EndpointKey = hub_id.parse().unwrap();
    let key = keys::load(&dir.join("hub.key")).unwrap();
    assert_eq!(keys::endpoint_key(&key), hub_key);
    assert_eq!(
        std::fs::metadata(dir.join("hub.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Re-running init keeps the key.
    let o = hub_cli(&dir, &["init"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).trim(), hub_id);

    let o = hub_cli(
        &dir,
        &[
            "token", "create", "--tenant", "acme", "--site", "store-1", "--role", "edge", "--ttl",
            "1h",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let tok = stdout(&o).trim().to_string();
    assert!(tok.starts_with("fsj1."), "{tok}");
    // Check the token with the library, against the key init printed.
    #[allow(clippy::disallowed_methods)]
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let claims = tokens::verify(
        &tok,
        &keys::verifying_key(&hub_key).unwrap(),
        Timestamp(now_ms),
    )
    .unwrap();
    assert_eq!(claims.tenant.as_str(), "acme");

    // Bad input is refused clearly.
    let o = hub_cli(
        &dir,
        &[
            "token", "create", "--tenant", "acme", "--site", "s", "--role", "admin",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("role admin cannot be granted"),
        "{}",
        stderr(&o)
    );
    let o = hub_cli(
        &dir,
        &[
            "token", "create", "--tenant", "acme", "--site", "s", "--ttl", "1y",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("invalid ttl"), "{}", stderr(&o));

    let ep = node(1).to_string();
    let o = hub_cli(&dir, &["node", "enrol", "--token", &tok, "--endpoint", &ep]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = hub_cli(
        &dir,
        &[
            "node",
            "enrol",
            "--token",
            &tok,
            "--endpoint",
            &node(2).to_string(),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("token already used by"),
        "{}",
        stderr(&o)
    );

    let o = hub_cli(&dir, &["node", "revoke", &ep, "--reason", "stolen box"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = hub_cli(&dir, &["node", "list"]);
    assert!(o.status.success());
    let listing = stdout(&o);
    assert!(
        listing.contains(&ep) && listing.contains("revoked") && listing.contains("stolen box"),
        "{listing}"
    );

    let o = hub_cli(&dir, &["node", "snapshot"]);
    assert!(o.status.success());
    let snap: SignedRegistry = serde_json::from_str(&stdout(&o)).unwrap();
    let snap = snap
        .verify(&keys::verifying_key(&hub_key).unwrap())
        .unwrap();
    assert!(snap.lookup(&node(1)).unwrap().is_revoked());

    // Every mutation is in the audit log, which verifies.
    let o = hub_cli(&dir, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("ok: 4 entries"), "{}", stdout(&o));
    let log = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    let actions: Vec<String> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["action"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        actions,
        ["hub.init", "token.create", "node.enrol", "node.revoke"]
    );
    assert!(log.contains("\"actor\":\"cli:test\""));
    assert!(log.contains("stolen box"));

    // --help explains.
    let o = Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(stdout(&o).contains("join token"), "{}", stdout(&o));
}

#[test]
fn cli_refuses_a_world_readable_hub_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(hub_cli(dir, &["init"]).status.success());
    std::fs::set_permissions(dir.join("hub.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = hub_cli(dir, &["token", "create", "--tenant", "a", "--site", "b"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
}

#[test]
fn cli_reads_the_hub_config_and_flags_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let from_cfg = tmp.path().join("from-config");
    let cfg = tmp.path().join("hub.toml");
    std::fs::write(
        &cfg,
        format!("data_dir = {:?}\n", from_cfg.display().to_string()),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(from_cfg.join("hub.key").exists());
    assert!(from_cfg.join("audit.log").exists());
    let flagged = tmp.path().join("from-flag");
    let o = run(&["--data-dir", flagged.to_str().unwrap(), "init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(flagged.join("hub.key").exists());
    assert_ne!(
        std::fs::read(from_cfg.join("hub.key")).unwrap(),
        std::fs::read(flagged.join("hub.key")).unwrap()
    );
    // A bad config file is named with the field at fault.
    std::fs::write(&cfg, "data_dirr = \"x\"\n").unwrap();
    let o = run(&["node", "list"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("hub.toml") && err.contains("data_dirr"),
        "{err}"
    );
}
