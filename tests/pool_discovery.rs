//! InferencePool discovery against a fake Kubernetes API server (tests/fake_http/kube.rs):
//! the pool fixture validates against the vendored CRD's OpenAPI schema (Python's
//! `jsonschema`, not our parser) and broken pools do not; a real `llmd route --pool-name`
//! follows the pool and its pods through watch events alone (pool mode never polls: every
//! LIST the server counts is explained by a start, a new selector or a 410), including a
//! watch the server closes and one it expires; the InferenceObjective watch hands its callback
//! the complete name → priority map after adds, changes and deletes.
mod common;
mod fake_http;

use common::{python_imports, LlmdProcess};
use fake_http::kube::{objective, pod, FakeKube, OBJECTIVES, PODS, POOLS};
use llmd::router::k8s::Api;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

fn dir() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

fn pool_fixture() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(format!("{}/tests/fixtures/inference_pool.json", dir())).unwrap(),
    )
    .unwrap()
}

const POOL_CRD: &str = "../shared/vendor/gateway-api-inference-extension/config/crd/bases/inference.networking.k8s.io_inferencepools.yaml";
const OBJECTIVE_CRD: &str =
    "../shared/vendor/llm-d-router/config/crd/bases/llm-d.ai_inferenceobjectives.yaml";

/// Each object checked against the CRD's `version` schema by Python's jsonschema (and its
/// apiVersion and kind against the CRD's group and kind): None when valid, else the first
/// error.
fn crd_errors(crd: &str, version: &str, objects: &[Value]) -> Vec<Option<String>> {
    let script = r#"
import json, sys, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
ver = next(v for v in crd["spec"]["versions"] if v["name"] == sys.argv[2])
schema = ver["schema"]["openAPIV3Schema"]
api_version = crd["spec"]["group"] + "/" + sys.argv[2]
out = []
for o in json.load(sys.stdin):
    errs = sorted(e.message for e in jsonschema.Draft7Validator(schema).iter_errors(o))
    if o.get("apiVersion") != api_version or o.get("kind") != crd["spec"]["names"]["kind"]:
        errs.insert(0, "apiVersion/kind is not " + api_version + " " + crd["spec"]["names"]["kind"])
    out.append(errs[0] if errs else None)
print(json.dumps(out))
"#;
    let crd = format!("{}/{crd}", dir());
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, &crd, version])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(objects).unwrap().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the schema check failed to run");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_pool_fixture_validates_against_the_crd_and_broken_pools_do_not() {
    if !python_imports(
        &["jsonschema", "yaml"],
        "python3 -m pip install jsonschema pyyaml",
    ) {
        return;
    }
    let good = pool_fixture();
    let broken: Vec<(&str, Value)> = vec![
        ("no targetPorts", {
            let mut p = good.clone();
            p["spec"].as_object_mut().unwrap().remove("targetPorts");
            p
        }),
        ("port 0", {
            let mut p = good.clone();
            p["spec"]["targetPorts"] = json!([{"number": 0}]);
            p
        }),
        ("port 70000", {
            let mut p = good.clone();
            p["spec"]["targetPorts"] = json!([{"number": 70000}]);
            p
        }),
        ("no matchLabels", {
            let mut p = good.clone();
            p["spec"]["selector"] = json!({});
            p
        }),
        ("empty matchLabels", {
            let mut p = good.clone();
            p["spec"]["selector"] = json!({"matchLabels": {}});
            p
        }),
        ("nine ports", {
            let mut p = good.clone();
            p["spec"]["targetPorts"] = json!((8000..8009)
                .map(|n| json!({"number": n}))
                .collect::<Vec<_>>());
            p
        }),
        ("a label value with a space", {
            let mut p = good.clone();
            p["spec"]["selector"]["matchLabels"]["app"] = json!("small lm");
            p
        }),
        ("a v1alpha2 apiVersion", {
            let mut p = good.clone();
            p["apiVersion"] = json!("inference.networking.x-k8s.io/v1alpha2");
            p
        }),
    ];
    let mut all = vec![good.clone()];
    all.extend(broken.iter().map(|(_, p)| p.clone()));
    let got = crd_errors(POOL_CRD, "v1", &all);
    assert_eq!(got[0], None, "the fixture pool must validate");
    for ((what, _), err) in broken.iter().zip(&got[1..]) {
        assert!(err.is_some(), "the CRD schema accepted a pool with {what}");
    }
    // What the schema refuses about the selector and ports, the router refuses too.
    use llmd::router::pool::Pool;
    assert_eq!(Pool::parse(&good).unwrap().ports, [8000, 8001]);
    for (what, p) in &broken[..5] {
        assert!(
            Pool::parse(p).is_err(),
            "the router took a pool with {what}"
        );
    }
    // The objectives the tests serve are valid InferenceObjectives; one without a poolRef is
    // not.
    let mut no_pool = objective("x", "smollm2", Some(1));
    no_pool["spec"].as_object_mut().unwrap().remove("poolRef");
    let got = crd_errors(
        OBJECTIVE_CRD,
        "v1alpha2",
        &[
            objective("chat", "smollm2", Some(10)),
            objective("plain", "smollm2", None),
            objective("batch", "smollm2", Some(-1)),
            no_pool,
        ],
    );
    assert_eq!(got[..3], [None, None, None]);
    assert!(got[3].is_some());
}

const SEL: &str = r#"{"app": "smollm2", "llm-d.ai/inferenceServing": "true"}"#;

fn labels(role: Option<&str>) -> Value {
    let mut l: Value = serde_json::from_str(SEL).unwrap();
    if let Some(r) = role {
        l["llm-d.ai/role"] = json!(r);
    }
    l
}

/// The (worker, role) pairs the router's /metrics lists.
fn router_workers(metrics: &str) -> BTreeSet<(String, String)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("llmd_router:in_flight_requests{worker=\""))
        .filter_map(|rest| {
            let (w, rest) = rest.split_once('"')?;
            let role = rest.strip_prefix(",role=\"")?.split('"').next()?;
            Some((w.to_string(), role.to_string()))
        })
        .collect()
}

/// Waits until the router's workers are exactly `want`.
async fn workers_are(r: &LlmdProcess, what: &str, want: &[(&str, &str)]) {
    let want: BTreeSet<(String, String)> = want
        .iter()
        .map(|(w, r)| (w.to_string(), r.to_string()))
        .collect();
    r.metrics_until(&format!("{what}: want {want:?}"), |m| {
        router_workers(m) == want
    })
    .await;
}

/// Waits until `n` watches of `coll` are open.
async fn watching(k: &FakeKube, coll: &str, n: usize) {
    for _ in 0..400 {
        if k.open_watches(coll) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{coll}: {} watches open, not {n}", k.open_watches(coll));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_follows_the_pool_and_its_pods_by_watch_and_resumes_dropped_watches() {
    let k = FakeKube::start().await;
    k.put(PODS, pod("a", "10.0.0.1", labels(None), true));
    k.put(PODS, pod("b", "10.0.0.2", labels(Some("decode")), true));
    k.put(PODS, pod("c", "10.0.0.3", labels(None), false));
    k.put(PODS, pod("d", "10.0.0.4", json!({"app": "other"}), true));
    // No pool yet: the router starts with no workers.
    let r = LlmdProcess::start(
        "route",
        &[
            "route",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model",
            &format!("{}/../shared/models/stories260K", dir()),
            "--pool-name",
            "smollm2",
            "--pool-namespace",
            "llm",
            "--k8s-api",
            &k.url(),
        ]
        .map(String::from),
        "",
    )
    .await;
    workers_are(&r, "no pool, no workers", &[]).await;
    assert_eq!(k.lists(PODS), 0, "no pool, no pods listed");

    k.put(POOLS, pool_fixture());
    workers_are(
        &r,
        "the pool's ready pods × its ports",
        &[
            ("http://10.0.0.1:8000", "prefill-decode"),
            ("http://10.0.0.1:8001", "prefill-decode"),
            ("http://10.0.0.2:8000", "decode"),
            ("http://10.0.0.2:8001", "decode"),
        ],
    )
    .await;
    watching(&k, PODS, 1).await;

    // c turns ready, a unready, b is deleted: each arrives by a watch event.
    k.put(PODS, pod("c", "10.0.0.3", labels(Some("prefill")), true));
    k.put(PODS, pod("a", "10.0.0.1", labels(None), false));
    k.delete(PODS, "b");
    workers_are(
        &r,
        "after c ready, a unready, b deleted",
        &[
            ("http://10.0.0.3:8000", "prefill"),
            ("http://10.0.0.3:8001", "prefill"),
        ],
    )
    .await;

    // The pool's ports change: same pods watch, new workers.
    let mut pool = pool_fixture();
    pool["spec"]["targetPorts"] = json!([{"number": 9000}]);
    k.put(POOLS, pool.clone());
    workers_are(
        &r,
        "after the ports change",
        &[("http://10.0.0.3:9000", "prefill")],
    )
    .await;
    assert_eq!(k.lists(PODS), 1, "a port change needs no new pod list");

    // The server ends every watch (its timeout); what changes meanwhile still arrives.
    k.close_watches();
    k.put(PODS, pod("a", "10.0.0.1", labels(None), true));
    workers_are(
        &r,
        "after a closed watch",
        &[
            ("http://10.0.0.1:9000", "prefill-decode"),
            ("http://10.0.0.3:9000", "prefill"),
        ],
    )
    .await;
    watching(&k, PODS, 1).await;
    watching(&k, POOLS, 1).await;
    assert_eq!(
        k.lists(PODS),
        1,
        "a cleanly closed watch resumes from its version"
    );

    // 410 as an ERROR event on the open watches: both are listed again.
    k.expire_watches();
    k.delete(PODS, "c");
    workers_are(
        &r,
        "after a 410 event",
        &[("http://10.0.0.1:9000", "prefill-decode")],
    )
    .await;
    watching(&k, PODS, 1).await;
    watching(&k, POOLS, 1).await;
    assert_eq!(k.lists(PODS), 2, "a 410 lists again");

    // A closed watch whose version is then compacted away: resuming is a 410 answer.
    k.close_watches();
    k.expire_watches();
    k.put(PODS, pod("e", "10.0.0.5", labels(Some("both")), true));
    workers_are(
        &r,
        "after a 410 answer",
        &[
            ("http://10.0.0.1:9000", "prefill-decode"),
            ("http://10.0.0.5:9000", "prefill-decode"),
        ],
    )
    .await;
    watching(&k, PODS, 1).await;
    assert_eq!(k.lists(PODS), 3);

    // A new selector: a new pods watch; the old one's pods go.
    pool["spec"]["selector"]["matchLabels"] = json!({"app": "other"});
    k.put(POOLS, pool);
    workers_are(
        &r,
        "after the selector changes",
        &[("http://10.0.0.4:9000", "prefill-decode")],
    )
    .await;
    watching(&k, PODS, 1).await;
    assert_eq!(k.lists(PODS), 4);

    // The pool is deleted: no workers.
    k.delete(POOLS, "smollm2");
    workers_are(&r, "after the pool is deleted", &[]).await;
    // Pool mode never polls: every pods LIST is one of the four above, pool LISTs are the
    // start and the two 410s.
    assert_eq!((k.lists(PODS), k.lists(POOLS)), (4, 3));
}

fn api(k: &FakeKube, timeout: Duration) -> Arc<Api> {
    Arc::new(Api {
        base: k.url(),
        token_file: None,
        timeout,
        client: Api::client(None).unwrap(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_objectives_callback_sees_every_change_as_the_whole_map() {
    let k = FakeKube::start().await;
    k.put(OBJECTIVES, objective("chat", "smollm2", Some(10)));
    k.put(OBJECTIVES, objective("elsewhere", "another-pool", Some(3)));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(llmd::router::pool::watch_objectives(
        api(&k, Duration::from_secs(5)),
        "llm".into(),
        Some("smollm2".into()),
        move |m| {
            let _ = tx.send(m);
        },
    ));
    let mut next = async move |what: &str| -> HashMap<String, i32> {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no callback {what}"))
            .unwrap()
    };
    let map = |l: &[(&str, i32)]| -> HashMap<String, i32> {
        l.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };
    assert_eq!(next("after the list").await, map(&[("chat", 10)]));
    k.put(OBJECTIVES, objective("batch", "smollm2", Some(-1)));
    assert_eq!(
        next("after an add").await,
        map(&[("chat", 10), ("batch", -1)])
    );
    k.put(OBJECTIVES, objective("chat", "smollm2", Some(20)));
    assert_eq!(
        next("after a change").await,
        map(&[("chat", 20), ("batch", -1)])
    );
    // Another pool's objective changes nothing the callback sees.
    k.put(OBJECTIVES, objective("elsewhere", "another-pool", Some(4)));
    k.put(OBJECTIVES, objective("plain", "smollm2", None));
    assert_eq!(
        next("after an unset priority").await,
        map(&[("chat", 20), ("batch", -1), ("plain", 0)])
    );
    k.delete(OBJECTIVES, "batch");
    assert_eq!(
        next("after a delete").await,
        map(&[("chat", 20), ("plain", 0)])
    );
    watching(&k, OBJECTIVES, 1).await;
    k.expire_watches();
    k.delete(OBJECTIVES, "chat");
    assert_eq!(next("after a 410").await, map(&[("plain", 0)]));
    watching(&k, OBJECTIVES, 1).await;
    k.close_watches();
    k.put(OBJECTIVES, objective("chat", "smollm2", Some(7)));
    assert_eq!(
        next("after a closed watch").await,
        map(&[("plain", 0), ("chat", 7)])
    );
    // A line that is not a watch event, then one over the 4 MiB bound: each time the
    // collection is listed again and the watch goes on.
    for bad in [b"{not json".to_vec(), vec![b'x'; (4 << 20) + 1]] {
        watching(&k, OBJECTIVES, 1).await;
        let lists = k.lists(OBJECTIVES);
        k.send_raw_and_close(&bad);
        k.delete(OBJECTIVES, "plain");
        assert_eq!(next("after a bad line").await, map(&[("chat", 7)]));
        assert_eq!(k.lists(OBJECTIVES), lists + 1, "a bad line lists again");
        k.put(OBJECTIVES, objective("plain", "smollm2", None));
        assert_eq!(
            next("after a bad line").await,
            map(&[("plain", 0), ("chat", 7)])
        );
    }
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_source_whose_api_is_down_is_an_error_not_a_hang() {
    use llmd::router::pool::{PodPorts, PoolSource};
    use llmd::router::workers::WorkerSource;
    // A port nobody listens on.
    let port = common::free_port();
    let api = Arc::new(Api {
        base: format!("http://127.0.0.1:{port}"),
        token_file: None,
        timeout: Duration::from_millis(500),
        client: Api::client(None).unwrap(),
    });
    let s = PoolSource::new(api, "llm".into(), "smollm2".into(), PodPorts::default());
    let e = tokio::time::timeout(Duration::from_secs(30), s.list())
        .await
        .expect("the list hung")
        .unwrap_err();
    assert!(
        e.contains("not listed within") && e.contains("Kubernetes API"),
        "{e}"
    );
}
