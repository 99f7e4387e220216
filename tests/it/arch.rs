//! The module graph: dependencies between top-level modules of `src/` point
//! one way, down the layers below. The test reads every `crate::<module>`
//! path in the sources; a new edge upward, a cycle, or a module missing
//! from the list fails it (add a new module to the layer it belongs to).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first. A module may name modules of its own layer or below.
const LAYERS: &[&[&str]] = &[
    &["error", "channel"],
    &["config", "metrics"],
    &["protocol", "interest"],
    &["hub"],
    &["broker"],
    &["body", "upstream"],
    &["auth", "proxy"],
    &["node"],
    &["session", "admin"],
    // The client-protocol fronts, above the core.
    &["socketio"],
    &["server"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// A source file without its comments (doc links are not dependencies).
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The names right after each `prefix` in `code` (`prefix{a, b}` names
/// several at once). `super::super::x` is not `super::` then `super`.
fn named_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut out = vec![];
    for (i, _) in code.match_indices(prefix) {
        if prefix == "super::" && code[..i].ends_with("super::") {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group[..group.find('}').unwrap()].split(',').collect(),
            None => vec![rest],
        };
        for n in names {
            let n = n.trim();
            let end = n.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(n.len());
            if end > 0 {
                out.push(&n[..end]);
            }
        }
    }
    out
}

/// module → the top-level modules its files name through `crate::`.
fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![];
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if path.is_dir() {
            // Every file below a module's folder belongs to it.
            let mut dirs = vec![path];
            while let Some(dir) = dirs.pop() {
                for f in std::fs::read_dir(&dir).unwrap() {
                    let f = f.unwrap().path();
                    if f.is_dir() { dirs.push(f) } else { files.push((name.clone(), f)) }
                }
            }
        } else if name != "lib" && name != "main" {
            files.push((name, path));
        }
    }
    for (module, file) in files {
        let text = code_of(&file);
        let deps = graph.entry(module.clone()).or_default();
        for dep in named_after(&text, "crate::") {
            if dep != module {
                deps.insert(dep.to_owned());
            }
        }
    }
    graph
}

#[test]
fn module_dependencies_point_down_the_layers() {
    let graph = edges();
    assert!(graph.len() >= 15, "read too few modules: {graph:?}");
    let mut wrong = vec![];
    for (module, deps) in &graph {
        let Some(own) = layer(module) else {
            wrong.push(format!("{module} is in no layer of tests/it/arch.rs"));
            continue;
        };
        for dep in deps {
            match layer(dep) {
                None => wrong.push(format!("{module} names crate::{dep}, which is in no layer")),
                Some(l) if l > own => wrong.push(format!("{module} (layer {own}) names {dep} (layer {l}): upward")),
                Some(_) => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_cycle_between_top_level_modules() {
    let graph = edges();
    // Depth-first search for a back edge; reports the cycle it finds.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<String> {
        if let Some(i) = path.iter().position(|p| *p == m) {
            return Some(format!("{} -> {m}", path[i..].join(" -> ")));
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for d in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        let mut path = vec![];
        if let Some(cycle) = visit(m, &graph, &mut path, &mut done) {
            panic!("import cycle: {cycle}");
        }
    }
}

#[test]
fn the_checker_reads_real_edges() {
    // The graph as read has real edges (so the checks above can fail).
    let graph = edges();
    assert!(graph["server"].contains("session"), "{:?}", graph["server"]);
    assert!(graph["hub"].contains("protocol"), "{:?}", graph["hub"]);
    assert!(!graph["hub"].contains("broker"), "the hub must not know the broker");
    // The broker reports upward through `BrokerEvents`: it names nothing
    // that holds sockets.
    for above in ["hub", "node", "session", "socketio"] {
        assert!(!graph["broker"].contains(above), "the broker names {above}: {:?}", graph["broker"]);
    }
}

/// Inside a module's folder, its files are layered too (lowest first; the
/// folder's `mod.rs`, its face and shared items, is left out). A file names
/// a sibling as `super::<file>` (`super::super::` from a subfolder) or
/// `crate::<module>::<file>`.
const INNER: &[(&str, &[&[&str]])] = &[
    ("session", &[&["transport", "front"], &["state"], &["membership"], &["requests"], &["upgrade"]]),
    ("socketio", &[&["engineio", "bridge"], &["trail", "transport", "requests"], &["connect"], &["http"]]),
];

/// file → the sibling files (of the same folder) it names.
fn inner_edges(module: &str, files: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(module);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if name == "mod" {
            continue;
        }
        // A subfolder is one unit: its files reach siblings one level further up.
        let (sources, up): (Vec<_>, &str) = if path.is_dir() {
            (std::fs::read_dir(&path).unwrap().map(|f| f.unwrap().path()).collect(), "super::super::")
        } else {
            (vec![path.clone()], "super::")
        };
        let deps = graph.entry(name.clone()).or_default();
        for src in sources {
            let code = code_of(&src);
            let full = format!("crate::{module}::");
            for prefix in [up, full.as_str()] {
                for dep in named_after(&code, prefix) {
                    if dep != name && files.contains(&dep) {
                        deps.insert(dep.to_owned());
                    }
                }
            }
        }
    }
    graph
}

#[test]
fn the_session_loop_knows_no_protocol() {
    // The core speaks to fronts through Codec, ProtocolFront, SocketState
    // and Transport: no Socket.IO (or other front) vocabulary in its code.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/session");
    for f in std::fs::read_dir(dir).unwrap() {
        let path = f.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("").to_lowercase();
            assert!(!code.contains("socketio"), "{}:{}: {line}", path.display(), n + 1);
        }
    }
}

#[test]
fn files_inside_a_folder_point_down_its_own_layers() {
    let mut wrong = vec![];
    for (module, layers) in INNER {
        let files: Vec<&str> = layers.iter().flat_map(|l| l.iter().copied()).collect();
        let at = |f: &str| layers.iter().position(|l| l.contains(&f));
        let graph = inner_edges(module, &files);
        assert!(graph.len() >= files.len(), "{module}: read too few files: {graph:?}");
        for (file, deps) in &graph {
            let Some(own) = at(file) else {
                wrong.push(format!("src/{module}/{file} is in no layer of INNER in tests/it/arch.rs"));
                continue;
            };
            for dep in deps {
                if let Some(l) = at(dep).filter(|l| *l > own) {
                    wrong.push(format!("src/{module}/{file} (layer {own}) names {dep} (layer {l}): upward"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The reader sees real edges inside folders (so the check can fail).
    let socketio = inner_edges("socketio", &["engineio", "trail", "transport", "connect", "http"]);
    assert!(socketio["http"].contains("connect") && socketio["connect"].contains("trail"), "{socketio:?}");
}
