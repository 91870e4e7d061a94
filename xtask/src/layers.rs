//! `cargo xtask layers`: the daemon's modules are layers, and they import
//! down, never up and never in a cycle.
//!
//! - The layers are the `pub mod` lines of `gateway/src/lib.rs`, bottom
//!   first. A layer is a folder (its modules are the files in it, its
//!   `mod.rs` only declares them) or a single file.
//! - Every `crate::` path a module names (in `use` trees and in code; test
//!   modules and comments left out) is an import of the module it reaches.
//! - A module may import its own layer and the layers declared before it.
//! - No set of modules imports each other in a cycle, within a layer or
//!   across.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{bail, Context, Result};

/// The layers, bottom first, from lib.rs's `pub mod` lines.
pub fn layers(src: &Path) -> Result<Vec<String>> {
    let lib = fs::read_to_string(src.join("lib.rs")).context("reading lib.rs")?;
    Ok(lib.lines().filter_map(|l| l.trim().strip_prefix("pub mod ")?.strip_suffix(';')).map(String::from).collect())
}

/// Module path (`flow::table`, `config`) -> source, for every module of
/// every layer. A `mod.rs` may hold only comments, attributes and `pub mod`
/// lines, so that no code hides from the check.
fn modules(src: &Path, layers: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for layer in layers {
        let dir = src.join(layer);
        if dir.is_dir() {
            let decl = fs::read_to_string(dir.join("mod.rs")).with_context(|| format!("reading {layer}/mod.rs"))?;
            if let Some(l) = decl
                .lines()
                .map(str::trim)
                .find(|l| !(l.is_empty() || l.starts_with("//") || l.starts_with("#[") || l.starts_with("pub mod ")))
            {
                bail!("{layer}/mod.rs declares its modules and nothing else; move `{l}` into a module");
            }
            for e in fs::read_dir(&dir)? {
                let p = e?.path();
                let Some(name) = p.file_stem().and_then(|s| s.to_str()) else { continue };
                if p.extension().is_some_and(|x| x == "rs") && name != "mod" {
                    out.insert(format!("{layer}::{name}"), fs::read_to_string(&p)?);
                }
            }
        } else {
            let file = src.join(format!("{layer}.rs"));
            out.insert(
                layer.clone(),
                fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?,
            );
        }
    }
    Ok(out)
}

/// Every path a `use` tree or a path expression names after `crate::`,
/// expanded: `a::{b::X, c}` gives `a::b::X` and `a::c`.
fn paths(code: &str) -> Vec<String> {
    fn tree(s: &[char], i: &mut usize, prefix: &str, out: &mut Vec<String>) {
        let mut seg = String::new();
        while *i < s.len() {
            let c = s[*i];
            if c == '{' {
                *i += 1;
                let base = format!("{prefix}{seg}");
                loop {
                    tree(s, i, &base, out);
                    match s.get(*i) {
                        Some(',') => *i += 1,
                        Some('}') => {
                            *i += 1;
                            break;
                        }
                        _ => break,
                    }
                }
                return;
            } else if c.is_alphanumeric() || c == '_' || c == ':' {
                seg.push(c);
                *i += 1;
            } else if c.is_whitespace() && seg.is_empty() {
                *i += 1;
            } else {
                break;
            }
        }
        if !seg.is_empty() {
            out.push(format!("{prefix}{seg}"));
        }
    }
    let mut out = Vec::new();
    for part in code.split("crate::").skip(1) {
        let s: Vec<char> = part.chars().collect();
        tree(&s, &mut 0, "", &mut out);
    }
    out
}

/// Module path -> the modules it imports.
pub fn imports(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let layers = layers(src)?;
    let files = modules(src, &layers)?;
    let mut graph = BTreeMap::new();
    for (m, text) in &files {
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
        let code: String = code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        // `super::x` in a layer's module names its sibling `x`.
        let code = match m.split_once("::") {
            Some((layer, _)) => code.replace("super::", &format!("crate::{layer}::")),
            None => code,
        };
        let mut out = BTreeSet::new();
        for p in paths(&code) {
            let segs: Vec<&str> = p.split("::").filter(|s| !s.is_empty()).collect();
            let hit = (1..=segs.len().min(2)).rev().map(|n| segs[..n].join("::")).find(|c| files.contains_key(c));
            if let Some(n) = hit.filter(|n| n != m) {
                out.insert(n);
            }
        }
        graph.insert(m.clone(), out);
    }
    Ok(graph)
}

/// The imports that go up: (module, imported module), where the imported
/// module's layer is declared after the importer's.
pub fn upward(layers: &[String], g: &BTreeMap<String, BTreeSet<String>>) -> Vec<(String, String)> {
    let rank = |m: &str| layers.iter().position(|l| l == m.split("::").next().unwrap_or_default());
    let mut out = Vec::new();
    for (a, to) in g {
        for b in to {
            if rank(b) > rank(a) {
                out.push((a.clone(), b.clone()));
            }
        }
    }
    out
}

/// The strongly connected sets of more than one module (Tarjan).
pub fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        for w in &t.g[v] {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t =
        T { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), out: Vec::new() };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

pub fn check(root: &Path) -> Result<()> {
    let src = root.join("gateway/src");
    let layers = layers(&src)?;
    let g = imports(&src)?;
    let up = upward(&layers, &g);
    let found = cycles(&g);
    if up.is_empty() && found.is_empty() {
        println!(
            "layers: {} modules in {} layers ({}), each importing down, no cycle",
            g.len(),
            layers.len(),
            layers.join(" < ")
        );
        return Ok(());
    }
    for (a, b) in &up {
        println!("layers: {a} imports {b}, a layer above its own (lib.rs declares the layers bottom first)");
    }
    for c in &found {
        println!("layers: these modules import each other in a cycle: {}", c.join(", "));
        for a in c {
            for b in g[a].iter().filter(|b| c.contains(b)) {
                println!("  {a} -> {b}");
            }
        }
    }
    bail!(
        "{} upward import(s) and {} import cycle(s) between the daemon's modules (see ARCHITECTURE.md)",
        up.len(),
        found.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &str)]) -> BTreeMap<String, BTreeSet<String>> {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    }

    #[test]
    fn finds_cycles_and_only_cycles() {
        assert!(cycles(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])).is_empty());
        let found = cycles(&graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e"), ("e", "d")]));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.contains(&vec!["a".into(), "b".into(), "c".into()]));
        assert!(found.contains(&vec!["d".into(), "e".into()]));
    }

    #[test]
    fn expands_use_trees() {
        let got = paths("use crate::{a::{b::X, c}, d};\nfn f() { crate::e::g(); }\n");
        assert_eq!(got, ["a::b::X", "a::c", "d", "e::g"]);
    }

    #[test]
    fn reads_layers_from_lib_and_finds_upward_imports() {
        let dir = std::env::temp_dir().join(format!("xtask-layers-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for d in ["low", "high"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        fs::write(dir.join("lib.rs"), "//! doc\npub mod low;\npub mod mid;\npub mod high;\n").unwrap();
        fs::write(dir.join("low/mod.rs"), "//! the bottom\npub mod a;\npub mod b;\n").unwrap();
        fs::write(dir.join("low/a.rs"), "use super::b::X;\n// crate::high::c\n").unwrap();
        fs::write(
            dir.join("low/b.rs"),
            "fn f() { crate::high::c::g(); }\n#[cfg(test)]\nmod tests { use crate::mid; }\n",
        )
        .unwrap();
        fs::write(dir.join("mid.rs"), "use crate::{low::{a, b::Y}, high::c};\n").unwrap();
        fs::write(dir.join("high/mod.rs"), "pub mod c;\n").unwrap();
        fs::write(dir.join("high/c.rs"), "use crate::low::b;\n").unwrap();
        let layers = layers(&dir).unwrap();
        let g = imports(&dir).unwrap();
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(layers, ["low", "mid", "high"]);
        assert_eq!(g["low::a"], set(&["low::b"]), "super:: is a sibling; comments are not imports");
        assert_eq!(g["low::b"], set(&["high::c"]), "test modules are not imports");
        assert_eq!(g["mid"], set(&["low::a", "low::b", "high::c"]));
        let up = upward(&layers, &g);
        assert_eq!(up, [("low::b".to_string(), "high::c".to_string()), ("mid".to_string(), "high::c".to_string())]);
        assert_eq!(cycles(&g), [vec!["high::c".to_string(), "low::b".to_string()]]);
        fs::write(dir.join("high/mod.rs"), "pub mod c;\nfn hidden() {}\n").unwrap();
        assert!(imports(&dir).is_err(), "code in a mod.rs is refused");
        fs::remove_dir_all(&dir).unwrap();
    }
}
