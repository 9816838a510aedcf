//! The conformance suite every backend must pass. A backend's test file calls
//! `sluice_store::store_suite!(async { make_store().await })` and gets one `#[tokio::test]` per
//! case; the calling crate needs `tokio` (with `macros` and `rt-multi-thread`) as a dependency.
//!
//! Each case names its tenants and runs with a fresh tag, so cases may share one database (as a
//! PostgreSQL instance will); `load_tasks` and `load_timers` are filtered by tenant for that reason.

#![expect(clippy::expect_used, reason = "suite cases are tests: a failed call fails the case")]

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::json;
use sluice_core::event::{EventKind, ParentRef, RunAccess, TaskKind, Visibility};
use sluice_core::{ErrorInfo, Event, ExecStatus};
use tokio::task::JoinSet;

use crate::{
    AuditFilter, AuditRow, Batch, BudgetAlertRow, Doc, ExecChange, ExecutionFilter, ExecutionRow, QueueDepth,
    RunChange, Settle, Sight, Store, StoreError, TaskOutcome, TaskRow, TimerRow, UsageFilter, UsageRow, UsageTotal,
    Wake, WorkflowSummary, WorkflowVersion,
};

/// Expands to one `#[tokio::test]` per conformance case; `$make` is an async expression that
/// yields a fresh store (any type implementing `Store`) and is evaluated once per test.
#[macro_export]
macro_rules! store_suite {
    ($make:expr) => {
        $crate::store_suite!(@borrowed $make;
            workflow_versions,
            commit_and_read_history,
            execution_row_round_trips,
            conflict_changes_nothing,
            update_of_unknown_run_is_not_found,
            idempotent_start,
            continue_as_new_is_atomic,
            tasks_and_timers,
            tenant_isolation,
            list_executions_order_and_filters,
            list_executions_pagination,
            usage_ledger,
            directory_and_audit,
            leases_and_fencing,
            shared_queues,
            ping,
        );
        $crate::store_suite!(@shared $make;
            concurrent_commits,
            failing_batch_does_not_fail_its_group,
            concurrent_steps_commit_and_fenced_ones_fail_alone,
            racing_starts_one_wins,
        );
    };
    (@borrowed $make:expr; $($case:ident),* $(,)?) => {$(
        #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $case() {
            let store = $make.await;
            $crate::suite::$case(&store).await;
        }
    )*};
    (@shared $make:expr; $($case:ident),* $(,)?) => {$(
        #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $case() {
            let store: ::std::sync::Arc<dyn $crate::Store> = ::std::sync::Arc::new($make.await);
            $crate::suite::$case(store).await;
        }
    )*};
}

/// Ledger rows are stored with the batch that carries them (also beside an execution change),
/// listed newest first with filters and a cursor, summed per tenant and key, and never shown to
/// another tenant; budget alerts are recorded once per key.
pub async fn usage_ledger(s: &dyn Store) {
    let fx = Fixture::new();
    let (t, other) = (fx.tenant("usage"), fx.tenant("usage-other"));
    let r = row(&fx.run_id(1), "wf-usage", "w", 1);
    let usage = |n: u32, tenant: &str, key: Option<&str>, at_ms: i64, run: Option<&ExecutionRow>| UsageRow {
        id: format!("{}-u{n:04}", fx.tag),
        tenant: tenant.into(),
        at_ms,
        api_key: key.map(str::to_string),
        source: if run.is_some() { "llm_step" } else { "chat" }.into(),
        route: "default".into(),
        target: "openai/gpt".into(),
        provider: "openai".into(),
        model: "gpt".into(),
        attempt: 1,
        input_tokens: 100 * u64::from(n),
        output_tokens: 10,
        cost_usd: if n == 3 { None } else { Some(0.25) },
        latency_us: 1500,
        outcome: if n == 2 { "http_500" } else { "success" }.into(),
        experiment: (n == 4).then(|| "exp".to_string()),
        arm: (n == 4).then(|| "b".to_string()),
        run_id: run.map(|r| r.run_id.clone()),
        workflow_id: run.map(|r| r.workflow_id.clone()),
        step: run.map(|_| "ask".to_string()),
    };
    let mut with_run = batch(vec![create(&t, r.clone())]);
    with_run.usage = vec![usage(1, &t, None, 1_000, Some(&r)), usage(2, &t, None, 1_001, Some(&r))];
    s.commit(with_run).await.expect("the ledger answers");
    let rows = vec![
        usage(3, &t, Some("key-a"), 2_000, None),
        usage(4, &t, Some("key-a"), 3_000, None),
        usage(5, &t, Some("key-b"), 4_000, None),
        usage(6, &other, Some("key-a"), 5_000, None),
    ];
    s.commit(Batch { usage: rows.clone(), ..Batch::default() }).await.expect("the ledger answers");
    // A replayed row (same id) is ignored, not doubled.
    s.commit(Batch { usage: vec![rows[0].clone()], ..Batch::default() }).await.expect("the ledger answers");

    let all = s.list_usage(&t, UsageFilter::default()).await.expect("the ledger answers");
    let ids: Vec<&str> = all.items.iter().map(|u| &u.id[u.id.len() - 4..]).collect();
    assert_eq!(ids, ["0005", "0004", "0003", "0002", "0001"]);
    assert_eq!(all.items[1], rows[1], "a ledger row must round-trip exactly");
    assert_eq!(all.items[2].cost_usd, None);
    assert_eq!(all.next_cursor, None);

    let by_run = s
        .list_usage(&t, UsageFilter { run_id: Some(r.run_id.clone()), ..UsageFilter::default() })
        .await
        .expect("the ledger answers");
    assert_eq!(by_run.items.len(), 2);
    assert!(by_run.items.iter().all(|u| u.step.as_deref() == Some("ask")));
    let by_key = s
        .list_usage(&t, UsageFilter { api_key: Some("key-a".into()), ..UsageFilter::default() })
        .await
        .expect("the ledger answers");
    assert_eq!(by_key.items.len(), 2);
    let since = s
        .list_usage(&t, UsageFilter { since_ms: Some(3_000), ..UsageFilter::default() })
        .await
        .expect("the ledger answers");
    assert_eq!(since.items.len(), 2);

    let mut cursor = None;
    let mut pages = Vec::new();
    loop {
        let page = s
            .list_usage(&t, UsageFilter { cursor, limit: 2, ..UsageFilter::default() })
            .await
            .expect("the ledger answers");
        pages.push(page.items.len());
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(pages.iter().sum::<usize>(), 5);
    assert!(pages.iter().all(|&n| n <= 2), "{pages:?}");

    let total = s.usage_total(&t, None, 0).await.expect("the ledger answers");
    assert_eq!((total.calls, total.input_tokens, total.output_tokens), (5, 1500, 50));
    assert!((total.cost_usd - 1.0).abs() < 1e-9, "{total:?}");
    let key_a = s.usage_total(&t, Some("key-a"), 0).await.expect("the ledger answers");
    assert_eq!((key_a.calls, key_a.input_tokens), (2, 700));
    assert!((key_a.cost_usd - 0.25).abs() < 1e-9, "{key_a:?}");
    let late = s.usage_total(&t, Some("key-a"), 2_500).await.expect("the ledger answers");
    assert_eq!(late.calls, 1);
    let nothing = s.usage_total(&fx.tenant("nobody"), None, 0).await.expect("the ledger answers");
    assert_eq!(nothing, UsageTotal::default());
    // Tenant scoping: the other tenant sees only its own row.
    let theirs = s.list_usage(&other, UsageFilter::default()).await.expect("the ledger answers");
    assert_eq!(theirs.items.len(), 1);
    assert_eq!(s.usage_total(&other, None, 0).await.expect("the ledger answers").calls, 1);

    let alert = |level: &str, spent: f64| BudgetAlertRow {
        tenant: t.clone(),
        budget: "monthly".into(),
        period_start_ms: 1_000,
        level: level.into(),
        limit_usd: 10.0,
        spent_usd: spent,
        at_ms: 7_000,
    };
    s.commit(Batch { alerts: vec![alert("soft", 8.5)], ..Batch::default() }).await.expect("the ledger answers");
    s.commit(Batch { alerts: vec![alert("soft", 9.0), alert("hard", 10.0)], ..Batch::default() })
        .await
        .expect("the ledger answers");
    let alerts = s.list_alerts(&t).await.expect("the ledger answers");
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    let soft = alerts.iter().find(|a| a.level == "soft").expect("the ledger answers");
    assert_eq!(soft.spent_usd, 8.5, "the first alert of a period stays");
    assert!(s.list_alerts(&other).await.expect("the ledger answers").is_empty());
}

/// Directory documents: create-only and compare-and-set writes, reads scoped by tenant, the one
/// cross-tenant lookup by id, deletes. The audit log: idempotent appends, newest first, filters
/// and pages, scoped by tenant.
pub async fn directory_and_audit(s: &dyn Store) {
    let fx = Fixture::new();
    let (t, other) = (fx.tenant("dir"), fx.tenant("dir-other"));
    let key_id = format!("{}-key", fx.tag);
    let doc = |tenant: &str, kind: &str, id: &str, version: i64, n: i64| Doc {
        tenant: tenant.into(),
        kind: kind.into(),
        id: id.into(),
        body: json!({"n": n, "name": "Ada"}),
        version,
        updated_at_ms: 1_000 + n,
    };
    assert!(s.put_doc(doc(&t, "user", "ada@example.com", 0, 1)).await.expect("directory answers"));
    assert!(!s.put_doc(doc(&t, "user", "ada@example.com", 0, 2)).await.expect("directory answers"), "create twice");
    let got = s.get_doc(&t, "user", "ada@example.com").await.expect("directory answers").expect("stored");
    assert_eq!((got.version, got.body["n"].clone(), got.updated_at_ms), (1, json!(1), 1_001));
    // Compare-and-set: the writer that read version 1 wins, a second one that read 1 loses.
    assert!(s.put_doc(doc(&t, "user", "ada@example.com", 1, 3)).await.expect("directory answers"));
    assert!(!s.put_doc(doc(&t, "user", "ada@example.com", 1, 4)).await.expect("directory answers"), "stale write");
    let got = s.get_doc(&t, "user", "ada@example.com").await.expect("directory answers").expect("stored");
    assert_eq!((got.version, got.body["n"].clone()), (2, json!(3)));
    // A write to a document that is not there is refused, not turned into an insert.
    assert!(!s.put_doc(doc(&t, "user", "nobody@example.com", 5, 1)).await.expect("directory answers"));

    assert!(s.put_doc(doc(&t, "user", "bob@example.com", 0, 5)).await.expect("directory answers"));
    assert!(s.put_doc(doc(&t, "api_key", &key_id, 0, 6)).await.expect("directory answers"));
    assert!(s.put_doc(doc(&other, "user", "ada@example.com", 0, 7)).await.expect("directory answers"));
    let users = s.list_docs(&t, "user").await.expect("directory answers");
    let ids: Vec<&str> = users.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["ada@example.com", "bob@example.com"], "by id, one kind, one tenant");
    assert_eq!(
        s.get_doc(&other, "user", "ada@example.com").await.expect("directory answers").expect("theirs").body["n"],
        7
    );
    assert!(s.get_doc(&other, "api_key", &key_id).await.expect("directory answers").is_none(), "tenant scoped");

    let found = s.find_doc("api_key", &key_id).await.expect("directory answers").expect("found across tenants");
    assert_eq!((found.tenant.as_str(), found.body["n"].clone()), (t.as_str(), json!(6)));
    assert!(s.find_doc("api_key", "no-such-key").await.expect("directory answers").is_none());

    assert!(s.delete_doc(&t, "user", "bob@example.com").await.expect("directory answers"));
    assert!(!s.delete_doc(&t, "user", "bob@example.com").await.expect("directory answers"));
    assert!(s.delete_doc(&t, "user", "ada@example.com").await.expect("directory answers"));
    assert!(s.get_doc(&t, "user", "ada@example.com").await.expect("directory answers").is_none());
    assert!(s.get_doc(&other, "user", "ada@example.com").await.expect("directory answers").is_some(), "theirs stays");

    let audit = |n: u32, tenant: &str, actor: &str| AuditRow {
        id: format!("{}-a{n:04}", fx.tag),
        tenant: tenant.into(),
        at_ms: 10_000 + i64::from(n),
        actor: actor.into(),
        role: Some("admin".into()),
        action: "POST /v1/executions".into(),
        target: format!("/v1/executions/{n}"),
        status: 201,
        source_ip: (n % 2 == 0).then(|| "127.0.0.1".to_string()),
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
    };
    let rows: Vec<AuditRow> =
        (1..=5).map(|n| audit(n, &t, if n <= 3 { "user:ada" } else { "key:k1" })).collect::<Vec<_>>();
    s.append_audit(rows.clone()).await.expect("audit answers");
    s.append_audit(vec![rows[0].clone(), audit(6, &other, "user:ada")]).await.expect("a replayed row is ignored");
    s.append_audit(Vec::new()).await.expect("nothing to append");
    let page = s.list_audit(&t, AuditFilter::default()).await.expect("audit answers");
    let ns: Vec<&str> = page.items.iter().map(|a| &a.id[a.id.len() - 4..]).collect();
    assert_eq!(ns, ["0005", "0004", "0003", "0002", "0001"]);
    assert_eq!(page.items[3], rows[1], "an audit row must round-trip exactly");
    let by_actor = s
        .list_audit(&t, AuditFilter { actor: Some("key:k1".into()), ..AuditFilter::default() })
        .await
        .expect("audit answers");
    assert_eq!(by_actor.items.len(), 2);
    let since = s
        .list_audit(&t, AuditFilter { since_ms: Some(10_003), ..AuditFilter::default() })
        .await
        .expect("audit answers");
    assert_eq!(since.items.len(), 3);
    let first = s.list_audit(&t, AuditFilter { limit: 2, ..AuditFilter::default() }).await.expect("audit answers");
    assert_eq!(first.items.len(), 2);
    let rest = s
        .list_audit(&t, AuditFilter { cursor: first.next_cursor.clone(), limit: 10, ..AuditFilter::default() })
        .await
        .expect("audit answers");
    assert_eq!(rest.items.len(), 3);
    assert_eq!(rest.next_cursor, None);
    let theirs = s.list_audit(&other, AuditFilter::default()).await.expect("audit answers");
    assert_eq!(theirs.items.len(), 1, "tenant scoped");
}

/// Stores versions; reads one by hash, the latest by `created_at_ms`, and the listings.
pub async fn workflow_versions(s: &dyn Store) {
    let f = Fixture::new();
    let t = f.tenant("t");
    let v1 = workflow("orders", "v1", 1_000);
    let v2 = workflow("orders", "v2", 2_000);
    // Stored last but older: "latest" goes by `created_at_ms`, not by insertion order.
    let v0 = workflow("orders", "v0", 500);
    let p1 = workflow("payments", "p1", 1_500);

    assert!(s.put_workflow(&t, v1.clone()).await.expect("put v1"));
    let again = WorkflowVersion { definition: "{\"changed\":true}".into(), ..v1.clone() };
    assert!(!s.put_workflow(&t, again).await.expect("put v1 again"), "same version twice");
    for v in [&v2, &v0, &p1] {
        assert!(s.put_workflow(&t, v.clone()).await.expect("put"), "new version {}", v.version);
    }

    let get = |name: &'static str, version: Option<&'static str>| s.get_workflow(&t, name, version);
    assert_eq!(get("orders", Some("v1")).await.expect("get v1"), Some(v1.clone()), "first put wins");
    assert_eq!(get("orders", Some("v0")).await.expect("get v0"), Some(v0.clone()));
    assert_eq!(get("orders", None).await.expect("get latest"), Some(v2.clone()));
    assert_eq!(get("payments", None).await.expect("get latest"), Some(p1.clone()));
    assert_eq!(get("orders", Some("nope")).await.expect("get unknown version"), None);
    assert_eq!(get("missing", None).await.expect("get unknown workflow"), None);

    assert_eq!(s.list_versions(&t, "orders").await.expect("versions"), vec![v2, v1.clone(), v0]);
    assert_eq!(s.list_versions(&t, "missing").await.expect("versions"), vec![]);
    let summary = |name: &str, latest: &str, versions, updated_at_ms| WorkflowSummary {
        name: name.into(),
        latest_version: latest.into(),
        versions,
        updated_at_ms,
    };
    assert_eq!(
        s.list_workflows(&t).await.expect("list workflows"),
        vec![summary("orders", "v2", 3, 2_000), summary("payments", "p1", 1, 1_500)]
    );

    // Published again, later: the old version is the latest again, with its first definition.
    let republished = WorkflowVersion { definition: "{\"changed\":true}".into(), created_at_ms: 3_000, ..v1.clone() };
    assert!(!s.put_workflow(&t, republished).await.expect("republish v1"), "not a new version");
    let v1_now = WorkflowVersion { created_at_ms: 3_000, ..v1.clone() };
    assert_eq!(get("orders", None).await.expect("get latest"), Some(v1_now.clone()));
    // An earlier time than stored does not move it back.
    assert!(!s.put_workflow(&t, WorkflowVersion { created_at_ms: 10, ..v1 }).await.expect("put v1 early"));
    assert_eq!(get("orders", None).await.expect("get latest"), Some(v1_now));
}

/// A created run reads back by workflow id, by run id and as a run; history honours `after` and
/// `limit` and grows by appends.
pub async fn commit_and_read_history(s: &dyn Store) {
    let f = Fixture::new();
    let t = f.tenant("t");
    let run = f.run_id(1);
    let mut create = create(&t, row(&run, "order-1", "orders", 1));
    let more = append(&t, &create.row, 2);
    create.events.extend(more.events);
    create.row = more.row;
    let stored = create.row.clone();
    let events = create.events.clone();
    s.commit(batch(vec![create])).await.expect("commit create");

    assert_eq!(s.get_execution(&t, "order-1", None).await.expect("latest"), Some(stored.clone()));
    assert_eq!(s.get_execution(&t, "order-1", Some(&run)).await.expect("by run"), Some(stored.clone()));
    assert_eq!(s.get_run(&t, &run).await.expect("run"), Some(stored.clone()));
    assert_eq!(s.get_execution(&t, "order-2", None).await.expect("other id"), None);
    assert_eq!(
        s.get_execution(&t, "order-2", Some(&run)).await.expect("run of another workflow id"),
        None,
        "a run is found only under its own workflow id"
    );
    assert_eq!(s.get_run(&t, &f.run_id(2)).await.expect("unknown run"), None);

    let history = |after, limit| s.history(&t, &run, after, limit);
    assert_eq!(history(0, 100).await.expect("history"), events);
    assert_eq!(history(1, 100).await.expect("after 1"), events[1..].to_vec());
    assert_eq!(history(0, 2).await.expect("limit 2"), events[..2].to_vec());
    assert_eq!(history(1, 1).await.expect("after 1 limit 1"), events[1..2].to_vec());
    assert_eq!(history(3, 100).await.expect("after the end"), vec![]);
    assert_eq!(s.history(&t, &f.run_id(2), 0, 100).await.expect("unknown run"), vec![]);

    let next = append(&t, &stored, 2);
    let appended = next.events.clone();
    let stored = next.row.clone();
    s.commit(batch(vec![next])).await.expect("commit append");
    assert_eq!(s.get_run(&t, &run).await.expect("run"), Some(stored));
    let all = history(0, 100).await.expect("history");
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(all[..3], events[..]);
    assert_eq!(all[3..], appended[..]);
}

/// Every column of an execution row survives a write and a read, including `None`s written over
/// values.
pub async fn execution_row_round_trips(s: &dyn Store) {
    let f = Fixture::new();
    let t = f.tenant("t");
    let run = f.run_id(1);
    let mut full = row(&run, "order-1", "orders", 1);
    full.version = "sha256:abc".into();
    full.status = ExecStatus::Failed;
    full.paused = true;
    full.dead_letter = true;
    full.input = json!({"items": [1, 2.5, "três", null, {"deep": [true]}], "empty": {}});
    full.output = Some(json!([{"a": 1}]));
    full.error = Some(ErrorInfo {
        kind: "timeout.start_to_close".into(),
        message: "no answer in 30s".into(),
        details: Some(json!({"attempt": 3})),
    });
    full.failed_step = Some("charge".into());
    full.parent = Some(parent(&f.run_id(0), "spawn"));
    let create = create(&t, full);
    let full = create.row.clone();
    s.commit(batch(vec![create])).await.expect("commit create");
    assert_eq!(s.get_run(&t, &run).await.expect("run"), Some(full.clone()));

    let mut change = append(&t, &full, 1);
    change.row.status = ExecStatus::Running;
    change.row.paused = false;
    change.row.dead_letter = false;
    change.row.output = None;
    change.row.error = None;
    change.row.failed_step = None;
    let cleared = change.row.clone();
    // Written once at create: an update does not change them.
    change.row.parent = None;
    change.row.input = json!("ignored");
    s.commit(batch(vec![change])).await.expect("commit update");
    assert_eq!(s.get_run(&t, &run).await.expect("run"), Some(cleared));
}

/// Optimistic concurrency: events that do not continue the stored history fail the whole batch
/// with `Conflict`, and nothing of it is applied.
pub async fn conflict_changes_nothing(s: &dyn Store) {
    let f = Fixture::new();
    let t = f.tenant("t");
    let (run_a, run_b) = (f.run_id(1), f.run_id(2));
    let mut setup = batch(vec![create(&t, row(&run_a, "a", "orders", 1)), create(&t, row(&run_b, "b", "orders", 2))]);
    let appended = append(&t, &setup.execs[0].row, 1);
    setup.execs[0].events.extend(appended.events);
    setup.execs[0].row = appended.row;
    let (row_a, row_b) = (setup.execs[0].row.clone(), setup.execs[1].row.clone());
    setup.add_tasks.push(task(&t, &row_a, "charge", 1));
    setup.add_timers.push(timer(&t, &row_a, "wait", 9_000));
    s.commit(setup).await.expect("commit setup");
    let before = Snapshot::take(s, &t, &[&run_a, &run_b]).await;
    assert_eq!(before.rows, vec![Some(row_a.clone()), Some(row_b.clone())]);

    let side_effects = |mut b: Batch| {
        b.add_tasks.push(task(&t, &row_a, "ship", 1));
        b.remove_tasks.push(TaskRow::make_id(&run_a, "charge", 1));
        b.add_timers.push(timer(&t, &row_a, "later", 10_000));
        b.remove_timers.push((run_a.clone(), "wait".into()));
        b
    };
    let mut gap = append(&t, &row_a, 2);
    renumber(&mut gap.events, row_a.next_seq + 2);
    let mut overlap = append(&t, &row_a, 2);
    renumber(&mut overlap.events, row_a.next_seq - 1);
    let attempts = [
        ("a gap", side_effects(batch(vec![gap]))),
        ("an overlap", side_effects(batch(vec![overlap.clone()]))),
        // The first change is valid on its own; the batch still fails as a whole.
        ("a bad second change", batch(vec![append(&t, &row_b, 1), overlap])),
        ("a created run beside a bad change", {
            let mut b = side_effects(batch(vec![create(&t, row(&f.run_id(3), "c", "orders", 3))]));
            let mut bad = append(&t, &row_a, 1);
            renumber(&mut bad.events, 1);
            b.execs.push(bad);
            b
        }),
    ];
    for (what, b) in attempts {
        match s.commit(b).await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("{what}: expected Conflict, got {other:?}"),
        }
        assert_eq!(Snapshot::take(s, &t, &[&run_a, &run_b]).await, before, "{what} changed the store");
        assert_eq!(s.get_run(&t, &f.run_id(3)).await.expect("run"), None, "{what} created a run");
    }

    // Two writers that read the same summary: the first wins, the second conflicts.
    let first = append(&t, &row_a, 1);
    let second = append(&t, &row_a, 3);
    s.commit(batch(vec![first.clone()])).await.expect("first writer");
    match s.commit(batch(vec![second])).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("stale writer: expected Conflict, got {other:?}"),
    }
    assert_eq!(s.get_run(&t, &run_a).await.expect("run"), Some(first.row));
    assert_eq!(s.history(&t, &run_a, 0, 100).await.expect("history").len(), 3);
}

/// Updating a run that does not exist fails with `NotFound` and applies nothing.
pub async fn update_of_unknown_run_is_not_found(s: &dyn Store) {
    let f = Fixture::new();
    let t = f.tenant("t");
    let ghost = create(&t, row(&f.run_id(1), "ghost", "orders", 1)).row;
    let mut b = batch(vec![append(&t, &ghost, 1)]);
    b.add_tasks.push(task(&t, &ghost, "charge", 1));
    match s.commit(b).await {
        Err(StoreError::NotFound) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(s.get_run(&t, &ghost.run_id).await.expect("run"), None);
    assert_eq!(tasks_of(s, &t).await, vec![]);
}

/// A second start of a running workflow id fails with the running run's id; once that run ends,
/// the workflow id can start again.
pub async fn idempotent_start(s: &dyn Store) {
    let f = Fixture::new();
    let (t, other_tenant) = (f.tenant("t"), f.tenant("u"));
    let first = create(&t, row(&f.run_id(1), "order-1", "orders", 1));
    let first_row = first.row.clone();
    s.commit(batch(vec![first])).await.expect("first start");

    let dup = create(&t, row(&f.run_id(2), "order-1", "orders", 2));
    assert_eq!(s.commit(batch(vec![dup])).await, Err(StoreError::AlreadyRunning(f.run_id(1))));
    assert_eq!(s.get_run(&t, &f.run_id(2)).await.expect("run"), None);
    assert_eq!(s.history(&t, &f.run_id(2), 0, 100).await.expect("history"), vec![]);

    // A batch that also starts another workflow id fails as a whole.
    let mut b = batch(vec![
        create(&t, row(&f.run_id(3), "order-3", "orders", 3)),
        create(&t, row(&f.run_id(4), "order-1", "orders", 4)),
    ]);
    b.add_tasks.push(task(&t, &b.execs[0].row, "charge", 1));
    assert_eq!(s.commit(b).await, Err(StoreError::AlreadyRunning(f.run_id(1))));
    assert_eq!(s.get_run(&t, &f.run_id(3)).await.expect("run"), None);
    assert_eq!(tasks_of(s, &t).await, vec![]);

    // Other workflow ids, and the same workflow id in another tenant, start freely.
    s.commit(batch(vec![create(&t, row(&f.run_id(5), "order-2", "orders", 5))])).await.expect("other id");
    s.commit(batch(vec![create(&other_tenant, row(&f.run_id(6), "order-1", "orders", 6))]))
        .await
        .expect("same id, other tenant");

    let done = finish(&t, &first_row, ExecStatus::Completed);
    let done_row = done.row.clone();
    s.commit(batch(vec![done])).await.expect("complete first");
    let again = create(&t, row(&f.run_id(7), "order-1", "orders", 7));
    let again_row = again.row.clone();
    s.commit(batch(vec![again])).await.expect("start after completion");
    assert_eq!(s.get_execution(&t, "order-1", None).await.expect("latest"), Some(again_row));
    assert_eq!(s.get_execution(&t, "order-1", Some(&f.run_id(1))).await.expect("first"), Some(done_row));
}

/// Continue-as-new: one batch ends the old run and creates the new one; if any part fails,
/// neither happens.
pub async fn continue_as_new_is_atomic(s: &dyn Store) {
    let f = Fixture::new();
    let t = f.tenant("t");
    let first = create(&t, row(&f.run_id(1), "loop", "poller", 1));
    let first_row = first.row.clone();
    let mut b = batch(vec![first]);
    b.add_tasks.push(task(&t, &first_row, "poll", 1));
    s.commit(b).await.expect("start");

    let old = finish(&t, &first_row, ExecStatus::ContinuedAsNew);
    let new = create(&t, row(&f.run_id(2), "loop", "poller", 2));
    let (old_row, new_row) = (old.row.clone(), new.row.clone());
    let mut b = batch(vec![old, new]);
    b.remove_tasks.push(TaskRow::make_id(&first_row.run_id, "poll", 1));
    b.add_tasks.push(task(&t, &new_row, "poll", 1));
    s.commit(b).await.expect("continue as new");
    assert_eq!(s.get_run(&t, &f.run_id(1)).await.expect("old run"), Some(old_row));
    assert_eq!(s.get_execution(&t, "loop", None).await.expect("latest"), Some(new_row.clone()));
    assert_eq!(tasks_of(s, &t).await, vec![task(&t, &new_row, "poll", 1)]);

    // Ending the current run on a stale history must not start the next one.
    let mut stale = finish(&t, &new_row, ExecStatus::ContinuedAsNew);
    renumber(&mut stale.events, 1);
    let next = create(&t, row(&f.run_id(3), "loop", "poller", 3));
    match s.commit(batch(vec![stale, next])).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(s.get_run(&t, &f.run_id(3)).await.expect("next run"), None);
    assert_eq!(s.get_execution(&t, "loop", None).await.expect("latest"), Some(new_row));
}

/// Tasks and timers are added and removed by batches and loaded while pending; removing what is
/// not there is not an error, and a timer added again replaces the old one.
pub async fn tasks_and_timers(s: &dyn Store) {
    let f = Fixture::new();
    let t = f.tenant("t");
    let first = create(&t, row(&f.run_id(1), "order-1", "orders", 1));
    let r = first.row.clone();
    let worker = TaskRow { schedule_to_start_ms: Some(60_000), heartbeat_ms: Some(5_000), ..task(&t, &r, "charge", 1) };
    // A task of a run started before trace ids has none.
    let http = TaskRow { kind: TaskKind::Http, queue: String::new(), trace_id: None, ..task(&t, &r, "notify", 1) };
    let (sleep, timeout) = (timer(&t, &r, "sleep", 5_000), timer(&t, &r, "approval", 7_000));
    let mut b = batch(vec![first]);
    b.add_tasks = vec![worker.clone(), http.clone()];
    b.add_timers = vec![sleep.clone(), timeout.clone()];
    s.commit(b).await.expect("add");
    assert_eq!(tasks_of(s, &t).await, sorted_tasks(vec![worker.clone(), http.clone()]));
    assert_eq!(timers_of(s, &t).await, sorted_timers(vec![sleep.clone(), timeout.clone()]));

    // One run's work: neither another run's (even one whose id extends this one's) nor another
    // tenant's.
    let next = create(&t, row(&format!("{}0", r.run_id), "order-10", "orders", 1));
    let other = next.row.clone();
    let mut b = batch(vec![next]);
    b.add_tasks = vec![task(&t, &other, "charge", 1)];
    b.add_timers = vec![timer(&t, &other, "sleep", 5_000)];
    s.commit(b).await.expect("another run");
    let (tasks, timers) = s.run_work(&t, &r.run_id).await.expect("run work");
    assert_eq!(sorted_tasks(tasks), sorted_tasks(vec![worker.clone(), http.clone()]));
    assert_eq!(sorted_timers(timers), sorted_timers(vec![sleep.clone(), timeout.clone()]));
    let (tasks, timers) = s.run_work(&t, &other.run_id).await.expect("run work");
    assert_eq!((tasks.len(), timers.len()), (1, 1));
    let (tasks, timers) = s.run_work(&f.tenant("elsewhere"), &r.run_id).await.expect("run work");
    assert!(tasks.is_empty() && timers.is_empty(), "another tenant sees nothing");
    s.commit(Batch {
        remove_tasks: vec![TaskRow::make_id(&other.run_id, "charge", 1)],
        remove_timers: vec![(other.run_id.clone(), "sleep".into())],
        ..Batch::default()
    })
    .await
    .expect("remove the other run's work");

    let retry = TaskRow { visible_at_ms: 99_000, ..task(&t, &r, "charge", 2) };
    let moved = TimerRow { fire_at_ms: 8_000, ..timeout.clone() };
    let b = Batch {
        remove_tasks: vec![worker.id.clone(), TaskRow::make_id(&r.run_id, "missing", 1)],
        add_tasks: vec![retry.clone()],
        remove_timers: vec![(r.run_id.clone(), "sleep".into()), (r.run_id.clone(), "missing".into())],
        add_timers: vec![moved.clone()],
        ..Batch::default()
    };
    s.commit(b).await.expect("replace");
    assert_eq!(tasks_of(s, &t).await, sorted_tasks(vec![http.clone(), retry.clone()]));
    assert_eq!(timers_of(s, &t).await, vec![moved]);

    let b = Batch {
        remove_tasks: vec![http.id, retry.id],
        remove_timers: vec![(r.run_id.clone(), "approval".into())],
        ..Batch::default()
    };
    s.commit(b).await.expect("remove");
    assert_eq!(tasks_of(s, &t).await, vec![]);
    assert_eq!(timers_of(s, &t).await, vec![]);
}

/// Nothing written under one tenant is visible to, or writable by, another.
pub async fn tenant_isolation(s: &dyn Store) {
    let f = Fixture::new();
    let (a, b) = (f.tenant("a"), f.tenant("b"));
    let run = f.run_id(1);
    s.put_workflow(&a, workflow("orders", "v1", 1_000)).await.expect("put");
    let create = create(&a, row(&run, "order-1", "orders", 1));
    let stored = create.row.clone();
    let mut setup = batch(vec![create]);
    setup.add_tasks.push(task(&a, &stored, "charge", 1));
    setup.add_timers.push(timer(&a, &stored, "sleep", 5_000));
    s.commit(setup).await.expect("commit");

    assert_eq!(s.get_workflow(&b, "orders", Some("v1")).await.expect("get"), None);
    assert_eq!(s.get_workflow(&b, "orders", None).await.expect("get latest"), None);
    assert_eq!(s.list_workflows(&b).await.expect("list"), vec![]);
    assert_eq!(s.list_versions(&b, "orders").await.expect("versions"), vec![]);
    assert_eq!(s.get_execution(&b, "order-1", None).await.expect("latest"), None);
    assert_eq!(s.get_execution(&b, "order-1", Some(&run)).await.expect("by run"), None);
    assert_eq!(s.get_run(&b, &run).await.expect("run"), None);
    assert_eq!(s.history(&b, &run, 0, 100).await.expect("history"), vec![]);
    for filter in [
        ExecutionFilter { limit: 100, ..ExecutionFilter::default() },
        ExecutionFilter { workflow_id: Some("order-1".into()), limit: 100, ..ExecutionFilter::default() },
        ExecutionFilter { workflow: Some("orders".into()), limit: 100, ..ExecutionFilter::default() },
        ExecutionFilter { status: Some(ExecStatus::Running), limit: 100, ..ExecutionFilter::default() },
    ] {
        let page = s.list_executions(&b, filter.clone()).await.expect("list");
        assert_eq!(page.items, vec![], "{filter:?}");
    }
    assert_eq!(tasks_of(s, &b).await, vec![]);
    assert_eq!(timers_of(s, &b).await, vec![]);

    // Tenant b cannot append to tenant a's run.
    let mut foreign = append(&a, &stored, 1);
    foreign.tenant = b.clone();
    assert_eq!(s.commit(batch(vec![foreign])).await, Err(StoreError::NotFound));
    assert_eq!(s.get_run(&a, &run).await.expect("run"), Some(stored.clone()));
    assert_eq!(s.history(&a, &run, 0, 100).await.expect("history").len(), 1);

    // And tenant a still sees all of it.
    assert!(s.get_workflow(&a, "orders", None).await.expect("get").is_some());
    assert_eq!(s.get_execution(&a, "order-1", None).await.expect("latest"), Some(stored.clone()));
    assert_eq!(tasks_of(s, &a).await, vec![task(&a, &stored, "charge", 1)]);
    assert_eq!(timers_of(s, &a).await, vec![timer(&a, &stored, "sleep", 5_000)]);
}

/// Listing is newest first (by run id) and every filter narrows it.
pub async fn list_executions_order_and_filters(s: &dyn Store) {
    let f = Fixture::new();
    let t = f.tenant("t");
    let specs = [
        ("orders", "o-1", ExecStatus::Completed, false),
        ("orders", "o-2", ExecStatus::Running, false),
        ("payments", "p-1", ExecStatus::Failed, true),
        ("orders", "o-1", ExecStatus::Running, false),
        ("payments", "p-2", ExecStatus::Running, false),
        ("orders", "o-3", ExecStatus::Failed, false),
        ("payments", "p-1", ExecStatus::Running, false),
        ("orders", "o-4", ExecStatus::Cancelled, false),
    ];
    let mut rows = Vec::new();
    for (n, (workflow, workflow_id, status, dead_letter)) in specs.into_iter().enumerate() {
        let mut r = row(&f.run_id(n as u32), workflow_id, workflow, n as i64);
        r.status = status;
        r.dead_letter = dead_letter;
        // Owners, private runs and a child of a `payments` run (its scope), read back as written.
        r.access = match n {
            1 => {
                RunAccess { owner: Some("user:ada@example.com".into()), visibility: Visibility::Private, scope: vec![] }
            }
            3 => RunAccess { owner: Some("user:ada@example.com".into()), ..RunAccess::default() },
            4 => {
                RunAccess { owner: Some("key:0123456789abcdef".into()), visibility: Visibility::Private, scope: vec![] }
            }
            5 => RunAccess { scope: vec!["billing".into(), "payments".into()], ..RunAccess::default() },
            _ => RunAccess::default(),
        };
        let change = create(&t, r);
        rows.push(change.row.clone());
        s.commit(batch(vec![change])).await.expect("create");
    }
    rows.reverse();

    let all = ExecutionFilter { limit: 100, ..ExecutionFilter::default() };
    let expect = |keep: &dyn Fn(&ExecutionRow) -> bool| rows.iter().filter(|r| keep(r)).cloned().collect::<Vec<_>>();
    let cases: Vec<(ExecutionFilter, Vec<ExecutionRow>)> = vec![
        (all.clone(), rows.clone()),
        (ExecutionFilter { workflow: Some("orders".into()), ..all.clone() }, expect(&|r| r.workflow == "orders")),
        (ExecutionFilter { workflow_id: Some("o-1".into()), ..all.clone() }, expect(&|r| r.workflow_id == "o-1")),
        (
            ExecutionFilter { status: Some(ExecStatus::Running), ..all.clone() },
            expect(&|r| r.status == ExecStatus::Running),
        ),
        (ExecutionFilter { dead_letter: true, ..all.clone() }, expect(&|r| r.dead_letter)),
        (
            ExecutionFilter { workflow: Some("payments".into()), status: Some(ExecStatus::Running), ..all.clone() },
            expect(&|r| r.workflow == "payments" && r.status == ExecStatus::Running),
        ),
        (ExecutionFilter { workflow: Some("none".into()), ..all.clone() }, vec![]),
        (
            ExecutionFilter { hidden_workflows: vec!["payments".into()], ..all.clone() },
            expect(&|r| r.workflow != "payments" && !r.access.scope.contains(&"payments".to_string())),
        ),
        (ExecutionFilter { hidden_workflows: vec!["payments".into(), "orders".into()], ..all.clone() }, vec![]),
        (
            ExecutionFilter {
                hidden_workflows: vec!["orders".into()],
                status: Some(ExecStatus::Running),
                ..all.clone()
            },
            expect(&|r| r.workflow != "orders" && r.status == ExecStatus::Running),
        ),
    ];
    // What one caller sees: its own private runs only, nothing of hidden workflows or under them.
    let sights = [
        Sight { hidden_workflows: vec![], viewer: Some("user:ada@example.com".into()) },
        Sight { hidden_workflows: vec![], viewer: Some("user:bob@example.com".into()) },
        Sight { hidden_workflows: vec!["payments".into()], viewer: None },
        Sight { hidden_workflows: vec!["billing".into()], viewer: Some("key:0123456789abcdef".into()) },
    ];
    let mut cases = cases;
    for sight in sights {
        let filter = ExecutionFilter {
            hidden_workflows: sight.hidden_workflows.clone(),
            viewer: sight.viewer.clone(),
            ..all.clone()
        };
        cases.push((filter, expect(&|r| sight.sees(r))));
    }
    assert_eq!(
        cases.last().map(|c| c.1.iter().map(|r| r.workflow_id.as_str()).collect::<Vec<_>>()),
        Some(vec!["o-4", "p-1", "p-2", "o-1", "p-1", "o-1"]),
        "the key sees its own private run, not ada's, nor the run under `billing`"
    );
    for (filter, expected) in cases {
        let page = s.list_executions(&t, filter.clone()).await.expect("list");
        assert_eq!(page.items, expected, "{filter:?}");
        assert_eq!(page.next_cursor, None, "{filter:?}");
    }

    let page = s.list_executions(&t, ExecutionFilter { limit: 3, ..all }).await.expect("list");
    assert_eq!(page.items, rows[..3].to_vec());
    assert!(page.next_cursor.is_some(), "a full page has a cursor");

    // Running runs, counted for concurrency limits.
    assert_eq!(s.count_running(&t, None).await.expect("count"), 4);
    assert_eq!(s.count_running(&t, Some("orders")).await.expect("count"), 2);
    assert_eq!(s.count_running(&t, Some("payments")).await.expect("count"), 2);
    assert_eq!(s.count_running(&t, Some("none")).await.expect("count"), 0);
    assert_eq!(s.count_running(&f.tenant("other"), None).await.expect("count"), 0);
}

/// Following cursors visits every matching row exactly once, newest first, in pages of at most
/// `limit`.
pub async fn list_executions_pagination(s: &dyn Store) {
    let f = Fixture::new();
    let t = f.tenant("t");
    let mut rows = Vec::new();
    for chunk in 0..5u32 {
        let mut execs = Vec::new();
        for i in 0..5 {
            let n = chunk * 5 + i;
            let mut r = row(&f.run_id(n), &format!("order-{n}"), "orders", i64::from(n));
            if n % 3 == 0 {
                r.status = ExecStatus::Completed;
            }
            execs.push(create(&t, r));
        }
        rows.extend(execs.iter().map(|c| c.row.clone()));
        s.commit(batch(execs)).await.expect("create five");
    }
    rows.reverse();

    let (items, pages) = list_all(s, &t, ExecutionFilter { limit: 7, ..ExecutionFilter::default() }).await;
    assert_eq!(items, rows);
    assert_eq!(pages, vec![7, 7, 7, 4]);

    let running = rows.iter().filter(|r| r.status == ExecStatus::Running).cloned().collect::<Vec<_>>();
    let filter = ExecutionFilter { status: Some(ExecStatus::Running), limit: 4, ..ExecutionFilter::default() };
    let (items, pages) = list_all(s, &t, filter).await;
    assert_eq!(items, running);
    assert!(pages.iter().all(|&n| n <= 4), "{pages:?}");
}

/// The database answers.
/// A run belongs to the epoch of the node that created it; another epoch cannot append to it
/// until the owner's lease expires and it takes the run over; from then on the old owner can
/// never append again, and the history stays one unbroken sequence.
pub async fn leases_and_fencing(s: &dyn Store) {
    let f = Fixture::new();
    let t = f.tenant("t");
    let (name_a, name_b) = (f.tenant("node-a"), f.tenant("node-b"));
    let a = s.register_node(&name_a, Some("http://a.example:7233"), 60_000).await.expect("register a");
    let b = s.register_node(&name_b, Some("http://b.example:7233"), 60_000).await.expect("register b");
    assert_ne!(a, b, "every registration is a new epoch");
    let fenced = |change: ExecChange, epoch: i64| ExecChange { fence: Some(epoch), ..change };
    let is_fenced = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Conflict(ref m)) if m.contains("fenced"));

    let run = f.run_id(1);
    let created = fenced(create(&t, row(&run, "lease-1", "orders", 1)), a);
    let mut current = created.row.clone();
    s.commit(batch(vec![created])).await.expect("a creates");
    let step = fenced(append(&t, &current, 1), a);
    let next = step.row.clone();
    s.commit(batch(vec![step])).await.expect("a appends");
    current = next;

    // Others learn where the owner is.
    assert_eq!(s.owner_url(&t, &run).await.expect("owner"), Some("http://a.example:7233".into()));
    assert_eq!(s.owner_url(&t, "no-such-run").await.expect("owner"), None);

    // B cannot write to A's run, nor take it while A's lease holds.
    assert!(is_fenced(s.commit(batch(vec![fenced(append(&t, &current, 1), b)])).await));
    let taken = s.take_over(b).await.expect("take over");
    assert!(!taken.iter().any(|(_, r)| r == &run), "a live lease keeps its runs: {taken:?}");

    // A's lease runs out (a lease of -1 s ends it now); B takes the run.
    assert!(s.renew_lease(a, -1_000).await.expect("renew"));
    let taken = s.take_over(b).await.expect("take over");
    assert!(taken.contains(&(t.clone(), run.clone())), "{taken:?}");
    assert!(!s.renew_lease(a, 60_000).await.expect("renew"), "a lost its lease");
    assert_eq!(s.owner_url(&t, &run).await.expect("owner"), Some("http://b.example:7233".into()));
    assert!(is_fenced(s.commit(batch(vec![fenced(append(&t, &current, 1), a)])).await), "a can never append again");
    let step = fenced(append(&t, &current, 2), b);
    let next = step.row.clone();
    s.commit(batch(vec![step])).await.expect("b appends");
    current = next;

    // A process that registers again under B's name ends B's epoch and takes its runs.
    let b2 = s.register_node(&name_b, None, 60_000).await.expect("register b again");
    assert!(!s.renew_lease(b, 60_000).await.expect("renew"), "the earlier epoch of the name ended");
    let taken = s.take_over(b2).await.expect("take over");
    assert!(taken.contains(&(t.clone(), run.clone())), "{taken:?}");
    assert!(is_fenced(s.commit(batch(vec![fenced(append(&t, &current, 1), b)])).await));
    s.commit(batch(vec![fenced(finish(&t, &current, ExecStatus::Completed), b2)])).await.expect("b2 finishes");

    // One history, numbered without a gap or a fork.
    let seqs: Vec<u64> = s.history(&t, &run, 0, 100).await.expect("history").iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(seqs.len(), 5, "start, a's step, b's two, the end");
    // Finished runs are nobody's to take.
    assert!(!s.take_over(a).await.unwrap_or_default().iter().any(|(_, r)| r == &run));

    // A finished run whose owner is gone may be changed (redriven) by any node, which then owns it.
    let d = s.register_node(&f.tenant("node-d"), Some("http://d.example:7233"), 60_000).await.expect("register d");
    assert!(s.renew_lease(b2, -1_000).await.expect("renew"));
    s.take_over(d).await.expect("take over ends b2's lease");
    let done = s.get_run(&t, &run).await.expect("run").expect("the run");
    let redrive = ExecChange { fence: Some(d), ..finish(&t, &done, ExecStatus::Running) };
    let next = redrive.row.clone();
    s.commit(batch(vec![redrive])).await.expect("d redrives a finished run of an ended node");
    assert_eq!(s.owner_url(&t, &run).await.expect("owner"), Some("http://d.example:7233".into()));
    let c = s.register_node(&f.tenant("node-c"), None, 60_000).await.expect("register c");
    assert!(is_fenced(s.commit(batch(vec![fenced(append(&t, &next, 1), c)])).await), "d owns it now");
}

/// Stores with shared queues (several nodes): claims never hand a task out twice and respect
/// tenants, visibility and the queue; an answer is posted once and only for a claimed task;
/// deadlines and posted answers are found for the owner; a batch settles a task only while it is
/// pending as it expects; commits and posts wake the listeners. Others skip this case.
pub async fn shared_queues(s: &dyn Store) {
    if !s.shared_queues() {
        return;
    }
    let f = Fixture::new();
    let (t, other) = (f.tenant("t"), f.tenant("other"));
    let a = s.register_node(&f.tenant("node-a"), None, 60_000).await.expect("register a");
    let b = s.register_node(&f.tenant("node-b"), None, 60_000).await.expect("register b");
    let heard = Arc::new(std::sync::Mutex::new(Vec::<Wake>::new()));
    let sink = heard.clone();
    s.listen(Arc::new(move |w| sink.lock().unwrap_or_else(|p| p.into_inner()).push(w))).await.expect("listen");
    let heard_one = |want: Wake| {
        let heard = heard.clone();
        async move {
            for _ in 0..100 {
                if heard.lock().unwrap_or_else(|p| p.into_inner()).contains(&want) {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            false
        }
    };
    // The listening connection is up once a wake-up sent now comes back.
    let probe = Wake::Ended { tenant: t.clone(), workflow_id: "probe".into(), run_id: "probe".into() };
    let mut up = false;
    for _ in 0..200 {
        s.notify(probe.clone()).await.expect("notify");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if heard.lock().unwrap_or_else(|p| p.into_inner()).contains(&probe) {
            up = true;
            break;
        }
    }
    assert!(up, "a wake-up sent through the store comes back to its listener");

    let now = crate::now_ms();
    let r = row(&f.run_id(1), "shared-1", "orders", 1);
    let created = ExecChange { fence: Some(a), ..create(&t, r.clone()) };
    let mut current = created.row.clone();
    let mut b1 = batch(vec![created]);
    let beat = TaskRow { heartbeat_ms: Some(1_000), ..task(&t, &r, "beat", 1) };
    let later = TaskRow { visible_at_ms: now + 60_000, ..task(&t, &r, "later", 1) };
    let waiting = TaskRow { schedule_to_start_ms: Some(5_000), visible_at_ms: now, ..task(&t, &r, "waiting", 1) };
    b1.add_tasks = vec![task(&t, &r, "charge", 1), beat.clone(), later.clone()];
    s.commit(b1).await.expect("create with tasks");
    // Tasks a node writes are reserved for its workers until it releases them.
    assert!(s.claim_tasks(&t, "payments", 10, now + 120_000, b).await.expect("claim").is_empty(), "reserved for a");
    let ids: Vec<String> =
        [&beat, &later].iter().map(|t| t.id.clone()).chain([TaskRow::make_id(&r.run_id, "charge", 1)]).collect();
    assert!(s.release_tasks(b, ids.clone()).await.expect("release").is_empty(), "only a releases what is a's");
    let mut released = s.release_tasks(a, ids.clone()).await.expect("release");
    released.sort();
    let mut want_released = ids.clone();
    want_released.sort();
    assert_eq!(released, want_released);
    assert!(
        heard_one(Wake::Tasks { tenant: t.clone(), queue: "payments".into(), n: 3 }).await,
        "released tasks wake the pollers: {:?}",
        heard.lock().unwrap_or_else(|p| p.into_inner())
    );
    assert!(s.release_tasks(a, ids).await.expect("release").is_empty(), "released once");
    assert!(s.live_nodes().await.expect("live nodes") >= 2);
    let ro = row(&f.run_id(2), "shared-2", "orders", 2);
    let mut b2 = batch(vec![ExecChange { fence: Some(b), ..create(&other, ro.clone()) }]);
    b2.add_tasks = vec![task(&other, &ro, "charge", 1)];
    s.commit(b2).await.expect("another tenant's task");

    let depth = |rows: Vec<QueueDepth>, tenant: &str| {
        rows.into_iter().filter(|d| d.tenant == tenant).map(|d| (d.queue, d.ready)).collect::<Vec<_>>()
    };
    let depths = s.queue_depths(now).await.expect("depths");
    assert_eq!(depth(depths, &t), [("payments".to_string(), 2)], "two visible, one delayed");

    // Ten claims at once of one task each: two are visible, each is handed out once.
    let claims = (0..10).map(|i| s.claim_tasks(&t, "payments", 1, now, if i % 2 == 0 { a } else { b }));
    let mut claimed: Vec<String> = Vec::new();
    for c in claims {
        claimed.extend(c.await.expect("claim").into_iter().map(|t| t.id));
    }
    claimed.sort();
    let mut want = vec![TaskRow::make_id(&r.run_id, "beat", 1), TaskRow::make_id(&r.run_id, "charge", 1)];
    want.sort();
    assert_eq!(claimed, want, "each visible task of the tenant's queue once, the delayed one not");
    assert!(s.claim_tasks(&t, "other-queue", 10, now + 120_000, a).await.expect("claim").is_empty());
    let got = s.claim_tasks(&t, "payments", 10, now + 120_000, b).await.expect("claim");
    assert_eq!(got, vec![later.clone()], "a delayed task is claimed once visible, and round-trips");

    assert!(depth(s.queue_depths(now).await.expect("depths"), &t).is_empty(), "claimed tasks wait for no one");

    // Heartbeats and answers only for claimed, pending tasks of the tenant.
    assert!(s.heartbeat_task(&t, &beat.id, now).await.expect("heartbeat"));
    assert!(!s.heartbeat_task(&other, &beat.id, now).await.expect("heartbeat"));
    assert!(!s.heartbeat_task(&t, "no-such-task", now).await.expect("heartbeat"));
    let charge = TaskRow::make_id(&r.run_id, "charge", 1);
    let done = TaskOutcome::Completed { output: json!({"paid": 12}) };
    assert!(!s.post_outcome(&other, &charge, done.clone()).await.expect("post"), "another tenant's task");
    assert!(s.post_outcome(&t, &charge, done.clone()).await.expect("post"));
    let failed = TaskOutcome::Failed { error: ErrorInfo::new("late", "too late"), retryable: true };
    assert!(!s.post_outcome(&t, &charge, failed).await.expect("post"), "an answer is posted once");
    assert!(heard_one(Wake::Outcome { epoch: a }).await, "a posted answer wakes the run's owner");
    let mut b3 = batch(vec![]);
    let waiting_run = row(&f.run_id(3), "shared-3", "orders", 3);
    b3.execs.push(ExecChange { fence: Some(a), ..create(&t, waiting_run.clone()) });
    b3.add_tasks = vec![TaskRow {
        run_id: waiting_run.run_id.clone(),
        id: TaskRow::make_id(&waiting_run.run_id, "waiting", 1),
        workflow_id: waiting_run.workflow_id.clone(),
        ..waiting.clone()
    }];
    s.commit(b3).await.expect("a task nobody claims");
    let waiting_id = TaskRow::make_id(&waiting_run.run_id, "waiting", 1);
    assert_eq!(s.release_tasks(a, vec![waiting_id.clone()]).await.expect("release"), std::slice::from_ref(&waiting_id));
    assert!(!s.post_outcome(&t, &waiting_id, done.clone()).await.expect("post"), "not claimed");

    let posted = s.posted_outcomes(a).await.expect("posted");
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!((posted[0].0.id.as_str(), &posted[0].1), (charge.as_str(), &done));
    assert!(s.posted_outcomes(b).await.expect("posted").is_empty(), "b owns none of them");

    // Deadlines: the heartbeat limit (1 s) first, then start-to-close (30 s); schedule-to-start
    // for one never claimed; nothing of another owner, nothing answered.
    let expired = |at: i64| async move {
        let mut x: Vec<(String, &str)> =
            s.expired_tasks(a, at).await.expect("expired").into_iter().map(|(t, k)| (t.step, k)).collect();
        x.sort();
        x
    };
    assert!(expired(now + 500).await.is_empty());
    assert_eq!(expired(now + 1_500).await, [("beat".to_string(), "timeout.heartbeat")]);
    assert_eq!(
        expired(now + 6_000).await,
        [("beat".to_string(), "timeout.heartbeat"), ("waiting".to_string(), "timeout.schedule_to_start")]
    );
    assert_eq!(
        expired(now + 200_000).await.into_iter().map(|(s, _)| s).collect::<Vec<_>>(),
        ["beat", "later", "waiting"]
    );
    assert!(s.expired_tasks(b, now + 200_000).await.expect("expired").is_empty());

    // Settling: the posted answer only as posted, a decided one only while none was posted.
    let settle = |current: &ExecutionRow, id: &str, posted: bool| {
        let change = ExecChange { fence: Some(a), ..append(&t, current, 1) };
        let next = change.row.clone();
        let mut b = batch(vec![change]);
        b.settles = vec![Settle { task_id: id.to_string(), posted }];
        (b, next)
    };
    let (wrong, _) = settle(&current, &charge, false);
    assert!(matches!(s.commit(wrong).await, Err(StoreError::Conflict(_))), "an answer was posted");
    let (wrong, _) = settle(&current, &beat.id, true);
    assert!(matches!(s.commit(wrong).await, Err(StoreError::Conflict(_))), "nothing was posted");
    let (right, next) = settle(&current, &charge, true);
    s.commit(right).await.expect("the posted answer is recorded");
    current = next;
    let (again, _) = settle(&current, &charge, true);
    assert!(matches!(s.commit(again).await, Err(StoreError::Conflict(_))), "recorded once");
    let (timeout, next) = settle(&current, &beat.id, false);
    s.commit(timeout).await.expect("a timeout is recorded");
    current = next;
    assert!(!s.heartbeat_task(&t, &beat.id, now).await.expect("heartbeat"), "a settled task is gone");
    assert!(!s.post_outcome(&t, &beat.id, done).await.expect("post"), "a settled task takes no answer");

    // Changes posted for the owner: only to a run of the tenant, listed for its owner, applied
    // once by a batch, or dropped.
    let go = RunChange::Signal { name: "go".into(), payload: json!({"n": 1}) };
    let (c1, c2) = (format!("{}-c1", f.tag), format!("{}-c2", f.tag));
    assert!(!s.post_change(&other, &r.run_id, &c1, go.clone()).await.expect("post"), "another tenant's run");
    assert!(!s.post_change(&t, "no-such-run", &c1, go.clone()).await.expect("post"));
    heard.lock().unwrap_or_else(|p| p.into_inner()).clear();
    assert!(s.post_change(&t, &r.run_id, &c1, go.clone()).await.expect("post"));
    assert!(heard_one(Wake::Outcome { epoch: a }).await, "a posted change wakes the run's owner");
    assert!(s.post_change(&t, &r.run_id, &c2, RunChange::Cancel { reason: None }).await.expect("post"));
    let changes = s.posted_changes(a).await.expect("changes");
    assert_eq!(
        changes.iter().map(|c| (&c.id, &c.change)).collect::<Vec<_>>(),
        [(&c1, &go), (&c2, &RunChange::Cancel { reason: None })]
    );
    assert_eq!((changes[0].tenant.as_str(), changes[0].run_id.as_str()), (t.as_str(), r.run_id.as_str()));
    assert!(s.posted_changes(b).await.expect("changes").is_empty());
    let apply = |current: &ExecutionRow, id: &str| {
        let change = ExecChange { fence: Some(a), ..append(&t, current, 1) };
        let next = change.row.clone();
        (Batch { applied_changes: vec![id.to_string()], ..batch(vec![change]) }, next)
    };
    let (first, next) = apply(&current, &c1);
    s.commit(first).await.expect("applied");
    current = next;
    let (again, _) = apply(&current, &c1);
    assert!(matches!(s.commit(again).await, Err(StoreError::Conflict(_))), "applied once");
    assert!(!s.drop_change(&other, &c2).await.expect("drop"), "another tenant's change");
    assert!(s.drop_change(&t, &c2).await.expect("drop"));
    assert!(s.posted_changes(a).await.expect("changes").is_empty());

    let end = batch(vec![ExecChange { fence: Some(a), ..finish(&t, &current, ExecStatus::Completed) }]);
    s.commit(end).await.expect("finish");

    // Wake-ups sent together all arrive.
    let ended = |n: u32| Wake::Ended { tenant: t.clone(), workflow_id: format!("shared-{n}"), run_id: format!("r{n}") };
    s.notify_all(vec![ended(1), ended(2)]).await.expect("notify");
    assert!(heard_one(ended(1)).await && heard_one(ended(2)).await, "many wake-ups in one call");

    // A node's claims end with its lease: the task is handed out again.
    let c = s.register_node(&f.tenant("node-c"), None, 60_000).await.expect("register c");
    let r4 = row(&f.run_id(4), "shared-4", "orders", 4);
    let mut b4 = batch(vec![ExecChange { fence: Some(a), ..create(&t, r4.clone()) }]);
    b4.add_tasks = vec![TaskRow { queue: "retry".into(), ..task(&t, &r4, "charge", 1) }];
    s.commit(b4).await.expect("a task");
    let retry_id = TaskRow::make_id(&r4.run_id, "charge", 1);
    assert_eq!(s.release_tasks(a, vec![retry_id]).await.expect("release").len(), 1);
    assert_eq!(s.claim_tasks(&t, "retry", 5, now, c).await.expect("claim").len(), 1);
    assert!(s.claim_tasks(&t, "retry", 5, now, a).await.expect("claim").is_empty());
    assert!(s.renew_lease(c, -1_000).await.expect("renew"));
    s.take_over(a).await.expect("take over");
    assert_eq!(s.claim_tasks(&t, "retry", 5, now, a).await.expect("claim").len(), 1, "released with c's lease");
}

pub async fn ping(s: &dyn Store) {
    s.ping().await.expect("ping");
}

/// Many batches committed at once, for different executions, all succeed and all read back.
pub async fn concurrent_commits(s: Arc<dyn Store>) {
    const N: u32 = 200;
    let f = Fixture::new();
    let t = f.tenant("t");
    let mut set = JoinSet::new();
    for n in 0..N {
        let (s, t) = (s.clone(), t.clone());
        let change = create(&t, row(&f.run_id(n), &format!("order-{n}"), "orders", i64::from(n)));
        set.spawn(async move {
            let r = change.row.clone();
            let mut b = batch(vec![change]);
            b.add_tasks.push(task(&t, &r, "charge", 1));
            s.commit(b).await.map(|()| r)
        });
    }
    let mut rows = Vec::new();
    while let Some(joined) = set.join_next().await {
        rows.push(joined.expect("join").expect("concurrent create"));
    }

    // A second wave appends to every run at once.
    let mut set = JoinSet::new();
    for r in &rows {
        let (s, change) = (s.clone(), append(&t, r, 1));
        set.spawn(async move { s.commit(batch(vec![change.clone()])).await.map(|()| change.row) });
    }
    let mut appended = Vec::new();
    while let Some(joined) = set.join_next().await {
        appended.push(joined.expect("join").expect("concurrent append"));
    }
    appended.sort_by(|x, y| y.run_id.cmp(&x.run_id));

    let (listed, _) = list_all(&*s, &t, ExecutionFilter { limit: 1000, ..ExecutionFilter::default() }).await;
    assert_eq!(listed, appended);
    for r in &appended {
        let seqs = s.history(&t, &r.run_id, 0, 100).await.expect("history").iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs, vec![1, 2], "run {}", r.run_id);
    }
    assert_eq!(tasks_of(&*s, &t).await.len(), N as usize);
}

/// Batches that fail (a duplicate start, a stale append) while others commit at the same time
/// fail alone: every valid batch beside them is applied.
pub async fn failing_batch_does_not_fail_its_group(s: Arc<dyn Store>) {
    const N: u32 = 300;
    let f = Fixture::new();
    let t = f.tenant("t");
    let busy = create(&t, row(&f.run_id(0), "busy", "orders", 0));
    let busy_row = busy.row.clone();
    s.commit(batch(vec![busy])).await.expect("start busy");
    let busy_history = s.history(&t, &busy_row.run_id, 0, 100).await.expect("history");

    let mut set = JoinSet::new();
    for n in 1..=N {
        let s = s.clone();
        let (kind, change) = match n % 3 {
            0 => ("duplicate", create(&t, row(&f.run_id(n), "busy", "orders", i64::from(n)))),
            1 => {
                let mut stale = append(&t, &busy_row, 1);
                renumber(&mut stale.events, 7);
                ("stale", stale)
            }
            _ => ("valid", create(&t, row(&f.run_id(n), &format!("order-{n}"), "orders", i64::from(n)))),
        };
        set.spawn(async move { (kind, change.row.clone(), s.commit(batch(vec![change])).await) });
    }
    let mut valid = BTreeSet::new();
    while let Some(joined) = set.join_next().await {
        let (kind, r, result) = joined.expect("join");
        match (kind, result) {
            ("valid", Ok(())) => {
                valid.insert(r.run_id);
            }
            ("duplicate", Err(StoreError::AlreadyRunning(id))) => assert_eq!(id, busy_row.run_id),
            ("stale", Err(StoreError::Conflict(_))) => {}
            (kind, result) => panic!("{kind} batch for {}: unexpected {result:?}", r.run_id),
        }
    }
    assert_eq!(valid.len(), (N as usize) / 3);
    for id in &valid {
        assert!(s.get_run(&t, id).await.expect("run").is_some(), "valid run {id} missing");
    }
    let (listed, _) = list_all(&*s, &t, ExecutionFilter { limit: 1000, ..ExecutionFilter::default() }).await;
    assert_eq!(listed.len(), valid.len() + 1, "only the valid runs and the busy one exist");
    assert_eq!(s.get_run(&t, &busy_row.run_id).await.expect("busy"), Some(busy_row.clone()));
    assert_eq!(s.history(&t, &busy_row.run_id, 0, 100).await.expect("history"), busy_history);
}

/// Many runs take a step at once, as a busy node's do (an event, the finished task removed and
/// the next one added, a timer replaced), while other batches for the same runs come from a
/// node that does not own them or from a stale read: every step of the owner is applied with
/// its tasks and timers, and every other batch fails alone with `Conflict`, changing nothing.
pub async fn concurrent_steps_commit_and_fenced_ones_fail_alone(s: Arc<dyn Store>) {
    const N: u32 = 120;
    let f = Fixture::new();
    let t = f.tenant("t");
    let owner = s.register_node(&f.tenant("node-owner"), None, 60_000).await.expect("register owner");
    let other = s.register_node(&f.tenant("node-other"), None, 60_000).await.expect("register other");
    let fenced = |change: ExecChange, epoch: i64| ExecChange { fence: Some(epoch), ..change };

    let mut set = JoinSet::new();
    for n in 0..N {
        let (s, t) = (s.clone(), t.clone());
        let change = fenced(create(&t, row(&f.run_id(n), &format!("step-{n}"), "orders", i64::from(n))), owner);
        set.spawn(async move {
            let r = change.row.clone();
            let mut b = batch(vec![change]);
            b.add_tasks.push(task(&t, &r, "charge", 1));
            b.add_timers.push(timer(&t, &r, "charge.timeout", 1_000 + i64::from(n)));
            s.commit(b).await.map(|()| r)
        });
    }
    let mut rows = Vec::new();
    while let Some(joined) = set.join_next().await {
        rows.push(joined.expect("join").expect("concurrent create"));
    }

    let mut set = JoinSet::new();
    for r in &rows {
        let step = {
            let mut b = batch(vec![fenced(append(&t, r, 2), owner)]);
            b.remove_tasks.push(TaskRow::make_id(&r.run_id, "charge", 1));
            b.add_tasks.push(task(&t, r, "ship", 1));
            b.remove_timers.push((r.run_id.clone(), "charge.timeout".into()));
            b.add_timers.push(timer(&t, r, "ship.timeout", 2_000));
            b
        };
        let intruder = {
            let mut b = batch(vec![fenced(append(&t, r, 1), other)]);
            b.add_tasks.push(task(&t, r, "intruder", 1));
            b
        };
        let mut stale = fenced(append(&t, r, 1), owner);
        renumber(&mut stale.events, 9);
        stale.row.next_seq = 10;
        for (kind, b) in [("step", step), ("intruder", intruder), ("stale", batch(vec![stale]))] {
            let s = s.clone();
            set.spawn(async move { (kind, b.execs[0].row.run_id.clone(), s.commit(b).await) });
        }
    }
    while let Some(joined) = set.join_next().await {
        match joined.expect("join") {
            ("step", _, Ok(())) => {}
            ("intruder", _, Err(StoreError::Conflict(m))) => assert!(m.contains("fenced"), "{m}"),
            ("stale", _, Err(StoreError::Conflict(_))) => {}
            (kind, run, result) => panic!("{kind} batch for {run}: unexpected {result:?}"),
        }
    }

    for r in &rows {
        let stored = s.get_run(&t, &r.run_id).await.expect("run").expect("the run");
        assert_eq!(stored.next_seq, 4, "run {}", r.run_id);
        let seqs: Vec<u64> = s.history(&t, &r.run_id, 0, 100).await.expect("history").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3], "run {}", r.run_id);
    }
    let tasks = tasks_of(&*s, &t).await;
    assert_eq!(tasks.len(), N as usize, "one task a run");
    assert!(tasks.iter().all(|task| task.step == "ship"), "only the owner's next tasks remain");
    let timers = timers_of(&*s, &t).await;
    assert_eq!(timers.len(), N as usize, "one timer a run");
    assert!(timers.iter().all(|timer| timer.step == "ship.timeout" && timer.fire_at_ms == 2_000));
}

/// Concurrent starts of one workflow id: exactly one wins, every other gets its run id.
pub async fn racing_starts_one_wins(s: Arc<dyn Store>) {
    const N: u32 = 50;
    let f = Fixture::new();
    let t = f.tenant("t");
    let mut set = JoinSet::new();
    for n in 0..N {
        let s = s.clone();
        let change = create(&t, row(&f.run_id(n), "race", "orders", i64::from(n)));
        set.spawn(async move { (change.row.clone(), s.commit(batch(vec![change])).await) });
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined.expect("join") {
            (r, Ok(())) => winners.push(r),
            (_, Err(StoreError::AlreadyRunning(id))) => losers.push(id),
            (r, Err(e)) => panic!("start {}: unexpected {e:?}", r.run_id),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one start wins");
    let winner = winners.remove(0);
    assert_eq!(losers.len(), N as usize - 1);
    assert!(losers.iter().all(|id| *id == winner.run_id), "losers name the winner");
    assert_eq!(s.get_execution(&t, "race", None).await.expect("latest"), Some(winner));
    let only = ExecutionFilter { workflow_id: Some("race".into()), limit: 100, ..ExecutionFilter::default() };
    assert_eq!(s.list_executions(&t, only).await.expect("list").items.len(), 1);
}

// Fixtures.

const T0: i64 = 1_700_000_000_000;

/// Names unique to one run of one case.
struct Fixture {
    tag: String,
}

impl Fixture {
    fn new() -> Self {
        Self { tag: uuid::Uuid::now_v7().simple().to_string() }
    }

    fn tenant(&self, name: &str) -> String {
        format!("{name}-{}", self.tag)
    }

    /// Run ids sort like the numbers they are made from, as UUIDv7 run ids sort by time.
    fn run_id(&self, n: u32) -> String {
        format!("{}-{n:08}", self.tag)
    }
}

fn workflow(name: &str, version: &str, created_at_ms: i64) -> WorkflowVersion {
    WorkflowVersion {
        name: name.into(),
        version: version.into(),
        definition: format!("{{\"name\":\"{name}\",\"steps\":[]}}"),
        created_at_ms,
    }
}

/// A running execution summary; `n` orders its timestamps.
fn row(run_id: &str, workflow_id: &str, workflow: &str, n: i64) -> ExecutionRow {
    ExecutionRow {
        run_id: run_id.into(),
        workflow_id: workflow_id.into(),
        workflow: workflow.into(),
        version: "v1".into(),
        status: ExecStatus::Running,
        paused: false,
        dead_letter: false,
        input: json!({"n": n}),
        output: None,
        error: None,
        failed_step: None,
        parent: None,
        access: Default::default(),
        next_seq: 1,
        created_at_ms: T0 + n,
        updated_at_ms: T0 + n,
    }
}

fn parent(run_id: &str, step: &str) -> ParentRef {
    // Built from JSON so that fields with serde defaults need no mention here.
    serde_json::from_value(json!({"workflow_id": "parent", "run_id": run_id, "step": step})).expect("parent ref")
}

/// A change that creates the run of `row` with its `ExecutionStarted` event.
fn create(tenant: &str, mut row: ExecutionRow) -> ExecChange {
    let started = Event {
        seq: 1,
        at_ms: row.created_at_ms,
        kind: EventKind::ExecutionStarted {
            workflow: row.workflow.clone(),
            version: row.version.clone(),
            workflow_id: row.workflow_id.clone(),
            run_id: row.run_id.clone(),
            input: row.input.clone(),
            parent: row.parent.clone(),
            continued_from: None,
            chain: 0,
            trace_id: None,
            access: row.access.clone(),
        },
    };
    row.next_seq = 2;
    ExecChange { tenant: tenant.into(), row, events: vec![started], create: true, fence: None }
}

/// A change that appends `n` step events to the run whose stored summary is `row`.
fn append(tenant: &str, row: &ExecutionRow, n: u64) -> ExecChange {
    let at_ms = row.updated_at_ms + 1;
    let events = (row.next_seq..row.next_seq + n)
        .map(|seq| Event { seq, at_ms, kind: EventKind::StepStarted { step: format!("s{seq}") } })
        .collect();
    let row = ExecutionRow { next_seq: row.next_seq + n, updated_at_ms: at_ms, ..row.clone() };
    ExecChange { tenant: tenant.into(), row, events, create: false, fence: None }
}

/// A change that ends the run whose stored summary is `row` with `status`.
fn finish(tenant: &str, row: &ExecutionRow, status: ExecStatus) -> ExecChange {
    let mut change = append(tenant, row, 1);
    change.events[0].kind = match status {
        ExecStatus::Completed => EventKind::ExecutionCompleted { output: json!("done") },
        ExecStatus::Failed => {
            EventKind::ExecutionFailed { error: ErrorInfo::new("boom", "it failed"), step: None, dead_letter: false }
        }
        ExecStatus::Cancelled => EventKind::ExecutionCancelled { reason: None },
        ExecStatus::ContinuedAsNew => EventKind::ExecutionContinuedAsNew { input: row.input.clone() },
        ExecStatus::Running => EventKind::ExecutionRedriven,
    };
    change.row.status = status;
    if status == ExecStatus::Completed {
        change.row.output = Some(json!("done"));
    }
    change
}

/// Gives `events` consecutive numbers from `first`.
fn renumber(events: &mut [Event], first: u64) {
    for (seq, e) in (first..).zip(events.iter_mut()) {
        e.seq = seq;
    }
}

fn batch(execs: Vec<ExecChange>) -> Batch {
    Batch { execs, ..Batch::default() }
}

fn task(tenant: &str, row: &ExecutionRow, step: &str, attempt: u32) -> TaskRow {
    TaskRow {
        id: TaskRow::make_id(&row.run_id, step, attempt),
        tenant: tenant.into(),
        queue: "payments".into(),
        kind: TaskKind::Worker,
        run_id: row.run_id.clone(),
        workflow_id: row.workflow_id.clone(),
        step: step.into(),
        attempt,
        input: json!({"step": step, "attempt": attempt}),
        visible_at_ms: row.updated_at_ms,
        schedule_to_start_ms: None,
        start_to_close_ms: 30_000,
        heartbeat_ms: None,
        created_at_ms: row.updated_at_ms,
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
    }
}

fn timer(tenant: &str, row: &ExecutionRow, step: &str, fire_at_ms: i64) -> TimerRow {
    TimerRow {
        tenant: tenant.into(),
        run_id: row.run_id.clone(),
        workflow_id: row.workflow_id.clone(),
        step: step.into(),
        fire_at_ms,
    }
}

fn sorted_tasks(mut tasks: Vec<TaskRow>) -> Vec<TaskRow> {
    tasks.sort_by(|a, b| a.id.cmp(&b.id));
    tasks
}

fn sorted_timers(mut timers: Vec<TimerRow>) -> Vec<TimerRow> {
    timers.sort_by(|a, b| (&a.run_id, &a.step).cmp(&(&b.run_id, &b.step)));
    timers
}

/// Pending tasks of one tenant, by id.
async fn tasks_of(s: &dyn Store, tenant: &str) -> Vec<TaskRow> {
    let all = s.load_tasks().await.expect("load tasks");
    sorted_tasks(all.into_iter().filter(|t| t.tenant == tenant).collect())
}

/// Pending timers of one tenant, by run and step.
async fn timers_of(s: &dyn Store, tenant: &str) -> Vec<TimerRow> {
    let all = s.load_timers().await.expect("load timers");
    sorted_timers(all.into_iter().filter(|t| t.tenant == tenant).collect())
}

/// Follows cursors to the end; returns the rows and the size of each page.
async fn list_all(s: &dyn Store, tenant: &str, mut filter: ExecutionFilter) -> (Vec<ExecutionRow>, Vec<usize>) {
    let mut items = Vec::new();
    let mut pages = Vec::new();
    loop {
        let page = s.list_executions(tenant, filter.clone()).await.expect("list");
        assert!(page.items.len() <= filter.limit, "page of {} over limit {}", page.items.len(), filter.limit);
        assert!(pages.len() < 1_000, "pagination does not end");
        pages.push(page.items.len());
        items.extend(page.items);
        match page.next_cursor {
            Some(cursor) => filter.cursor = Some(cursor),
            None => break,
        }
    }
    let ids = items.iter().map(|r| r.run_id.as_str()).collect::<BTreeSet<_>>();
    assert_eq!(ids.len(), items.len(), "a row appeared on two pages");
    (items, pages)
}

/// Everything a batch about some runs of one tenant could have changed.
#[derive(Debug, PartialEq)]
struct Snapshot {
    rows: Vec<Option<ExecutionRow>>,
    histories: Vec<Vec<Event>>,
    tasks: Vec<TaskRow>,
    timers: Vec<TimerRow>,
}

impl Snapshot {
    async fn take(s: &dyn Store, tenant: &str, runs: &[&str]) -> Self {
        let mut rows = Vec::new();
        let mut histories = Vec::new();
        for run in runs {
            rows.push(s.get_run(tenant, run).await.expect("run"));
            histories.push(s.history(tenant, run, 0, 1_000).await.expect("history"));
        }
        Self { rows, histories, tasks: tasks_of(s, tenant).await, timers: timers_of(s, tenant).await }
    }
}
