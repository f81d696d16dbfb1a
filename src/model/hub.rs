//! Resolving a `--model` argument to a local Hugging Face model directory.
//!
//! An existing directory is used as it is. Anything else of the form `owner/name` is a hub id:
//! its files are looked up in the Hugging Face cache (`$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`, the layout Python's `huggingface_hub` writes, so a model fetched
//! by either is found by both) and downloaded into it when missing, unless `HF_HUB_OFFLINE` is
//! set. `HF_ENDPOINT` points at a mirror; the token is `$HF_TOKEN`, else the one from
//! `huggingface-cli login`.
//! What is fetched is what the loader reads: `config.json`, the tokenizer files, the generation
//! config, and the safetensors weights (sharded through their index, or one file).
use super::ModelError;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Files the loader needs.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
/// Files the loader reads when present.
const OPTIONAL: &[&str] = &["tokenizer_config.json", "generation_config.json"];
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// Where files of a hub model come from: the cache only, or the cache then the network.
trait Fetch {
    /// The local path of `file`; `Ok(None)` when the repository has no such file.
    fn get(&self, file: &str) -> Result<Option<PathBuf>, String>;
}

/// True for `owner/name` (one slash, no path syntax), the only form hub ids take here.
pub fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// The local directory for `spec`: the directory itself, or a hub id's cached snapshot
/// (downloaded first when missing and the machine is online).
pub fn resolve_model(spec: &str) -> Result<PathBuf, ModelError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !is_hub_id(spec) {
        return Err(ModelError::Hub {
            model: spec.to_string(),
            reason: "no such directory, and not a hub id of the form owner/name".into(),
        });
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    let cache = Cache::from_env();
    let hub_err = |reason: String| ModelError::Hub {
        model: spec.to_string(),
        reason,
    };
    if offline {
        let repo = cache.repo(Repo::new(spec.to_string(), RepoType::Model));
        let cached = CachedOnly(repo);
        return fetch_model(&cached).map_err(|r| {
            hub_err(format!(
                "{r} (HF_HUB_OFFLINE is set, so only the cache at {} was searched)",
                cache.path().display()
            ))
        });
    }
    // HF_TOKEN (what llm-d's chart sets from its secret) before the `huggingface-cli login`
    // token file, as huggingface_hub reads them.
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
    let mut builder = ApiBuilder::from_env();
    if token.is_some() {
        builder = builder.with_token(token);
    }
    let api = builder
        .build()
        .map_err(|e| hub_err(format!("cannot start the hub client: {e}")))?;
    let online = Online(api.model(spec.to_string()));
    fetch_model(&online).map_err(hub_err)
}

/// Where a model argument leads, found without downloading anything (`--check-config`).
#[derive(Debug)]
pub enum Located {
    /// A directory given as it is, holding every file the loader needs.
    Dir(PathBuf),
    /// A hub id complete in the Hugging Face cache: its snapshot.
    Cached(PathBuf),
    /// A hub id not (completely) in the cache at `cache`: `llmd` downloads it at start.
    Download { cache: PathBuf, missing: String },
}

/// What [`resolve_model`] would do with `spec`, without the network: a directory (checked to
/// hold the loader's files), a complete cached snapshot, or a download at start — and, where
/// start would fail (not a hub id, a directory missing files, an uncached model with
/// `HF_HUB_OFFLINE` set), the same error.
pub fn locate(spec: &str) -> Result<Located, ModelError> {
    let path = Path::new(spec);
    let hub_err = |reason: String| ModelError::Hub {
        model: spec.to_string(),
        reason,
    };
    if path.is_dir() {
        fetch_model(&LocalDir(path.to_path_buf())).map_err(hub_err)?;
        return Ok(Located::Dir(path.to_path_buf()));
    }
    if !is_hub_id(spec) {
        return Err(hub_err(
            "no such directory, and not a hub id of the form owner/name".into(),
        ));
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    let cache = Cache::from_env();
    let repo = cache.repo(Repo::new(spec.to_string(), RepoType::Model));
    match fetch_model(&CachedOnly(repo)) {
        Ok(dir) => Ok(Located::Cached(dir)),
        Err(r) if offline => Err(hub_err(format!(
            "{r} (HF_HUB_OFFLINE is set, so only the cache at {} was searched)",
            cache.path().display()
        ))),
        Err(r) => Ok(Located::Download {
            cache: cache.path().clone(),
            missing: r,
        }),
    }
}

/// Fetches every file the loader reads and returns their directory (the snapshot).
fn fetch_model(src: &dyn Fetch) -> Result<PathBuf, String> {
    let mut dir = None;
    for f in REQUIRED {
        let p = src
            .get(f)?
            .ok_or_else(|| format!("the repository has no {f}"))?;
        dir.get_or_insert_with(|| p.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    for f in OPTIONAL {
        src.get(f)?;
    }
    match src.get(INDEX)? {
        Some(index) => {
            for shard in shard_names(&index)? {
                src.get(&shard)?
                    .ok_or_else(|| format!("the repository has no shard {shard}"))?;
            }
        }
        None => {
            src.get(SINGLE)?.ok_or_else(|| {
                format!("the repository has neither {SINGLE} nor {INDEX} (only safetensors weights are loaded)")
            })?;
        }
    }
    dir.ok_or_else(|| "nothing was fetched".to_string())
}

/// The distinct shard file names of a safetensors index, in order.
fn shard_names(index: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index).map_err(|e| format!("reading {INDEX}: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{INDEX} is not JSON: {e}"))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| format!("{INDEX} has no weight_map"))?;
    let mut names: Vec<String> = Vec::new();
    for f in map.values() {
        let f = f
            .as_str()
            .ok_or_else(|| format!("{INDEX}: a weight_map value is not a file name"))?;
        if f.contains('/') || f.contains("..") {
            return Err(format!(
                "{INDEX}: shard name {f:?} is not a plain file name"
            ));
        }
        if !names.iter().any(|n| n == f) {
            names.push(f.to_string());
        }
    }
    Ok(names)
}

struct CachedOnly(hf_hub::CacheRepo);

impl Fetch for CachedOnly {
    fn get(&self, file: &str) -> Result<Option<PathBuf>, String> {
        Ok(self.0.get(file))
    }
}

/// A model directory: a file is there or not.
struct LocalDir(PathBuf);

impl Fetch for LocalDir {
    fn get(&self, file: &str) -> Result<Option<PathBuf>, String> {
        let p = self.0.join(file);
        Ok(p.is_file().then_some(p))
    }
}

struct Online(hf_hub::api::sync::ApiRepo);

impl Fetch for Online {
    fn get(&self, file: &str) -> Result<Option<PathBuf>, String> {
        match self.0.get(file) {
            Ok(p) => Ok(Some(p)),
            // The repository lacks the file: fine for optional files, named for required ones.
            Err(e) if e.to_string().contains("status code 404") => Ok(None),
            Err(e) => Err(format!("downloading {file}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn hub_ids_are_owner_slash_name() {
        assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(is_hub_id("meta-llama/Llama-3.2-1B"));
        for bad in [
            "gpt2",
            "./a/b",
            "/abs/path",
            "a/b/c",
            "../x",
            "a/..",
            "a b/c",
            "a/",
            "",
        ] {
            assert!(!is_hub_id(bad), "{bad}");
        }
    }

    #[test]
    fn missing_directory_that_is_no_hub_id_is_named() {
        let e = resolve_model("/no/such/dir").unwrap_err().to_string();
        assert!(
            e.contains("/no/such/dir") && e.contains("no such directory"),
            "{e}"
        );
    }

    #[test]
    fn a_local_directory_must_hold_what_the_loader_reads() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().to_str().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let e = locate(spec).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        let e = locate(spec).unwrap_err().to_string();
        assert!(e.contains(SINGLE) && e.contains(INDEX), "{e}");
        std::fs::write(dir.path().join(SINGLE), "").unwrap();
        assert!(matches!(locate(spec), Ok(Located::Dir(d)) if d == dir.path()));
        assert!(locate("/no/such/dir").is_err());
    }

    /// A fake repository: file name -> local path (files exist in a temp dir).
    struct Fake(HashMap<String, PathBuf>);

    impl Fetch for Fake {
        fn get(&self, file: &str) -> Result<Option<PathBuf>, String> {
            Ok(self.0.get(file).cloned())
        }
    }

    fn fake(dir: &Path, files: &[(&str, &str)]) -> Fake {
        let mut m = HashMap::new();
        for (name, body) in files {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            m.insert(name.to_string(), p);
        }
        Fake(m)
    }

    #[test]
    fn sharded_and_single_repositories_resolve_to_their_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let index =
            r#"{"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors","c":"m-1.safetensors"}}"#;
        let src = fake(
            d.path(),
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                (INDEX, index),
                ("m-1.safetensors", ""),
                ("m-2.safetensors", ""),
            ],
        );
        assert_eq!(fetch_model(&src).unwrap(), d.path());
        let src = fake(
            d.path(),
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                (SINGLE, ""),
            ],
        );
        assert_eq!(fetch_model(&src).unwrap(), d.path());
    }

    #[test]
    fn incomplete_repositories_say_what_is_missing() {
        let d = tempfile::tempdir().unwrap();
        let e = fetch_model(&fake(d.path(), &[("config.json", "{}")])).unwrap_err();
        assert!(e.contains("tokenizer.json"), "{e}");
        let e = fetch_model(&fake(
            d.path(),
            &[("config.json", "{}"), ("tokenizer.json", "{}")],
        ))
        .unwrap_err();
        assert!(e.contains("model.safetensors"), "{e}");
        let index = r#"{"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors"}}"#;
        let e = fetch_model(&fake(
            d.path(),
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                (INDEX, index),
                ("m-1.safetensors", ""),
            ],
        ))
        .unwrap_err();
        assert!(e.contains("m-2.safetensors"), "{e}");
        let e = fetch_model(&fake(
            d.path(),
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                (INDEX, r#"{"weight_map":{"a":"../../etc/passwd"}}"#),
            ],
        ))
        .unwrap_err();
        assert!(e.contains("not a plain file name"), "{e}");
    }
}
