//! `cargo xtask layers`: the daemon's modules must not import each other in
//! a cycle. Reads each `gateway/src/*.rs` (test modules and comments left
//! out), takes every `crate::module` it names (in paths and `use crate::{..}`
//! lists) as an import, and fails on any strongly connected set of more than
//! one module, naming it and the imports inside it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{bail, Context, Result};

/// Module name -> the modules it imports.
pub fn imports(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut files = BTreeMap::new();
    for e in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let p = e?.path();
        let Some(name) = p.file_stem().and_then(|s| s.to_str()) else { continue };
        if p.extension().is_some_and(|x| x == "rs") && name != "lib" && name != "main" {
            files.insert(name.to_string(), fs::read_to_string(&p)?);
        }
    }
    let names: BTreeSet<String> = files.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (m, text) in &files {
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
        let code: String = code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        let mut out = BTreeSet::new();
        let mut add = |word: &str| {
            if word != m && names.contains(word) {
                out.insert(word.to_string());
            }
        };
        for part in code.split("crate::").skip(1) {
            if let Some(list) = part.strip_prefix('{') {
                // `use crate::{a::X, b, c::{..}}`: the first segment of each
                // top-level item.
                let (mut depth, mut item) = (0, String::new());
                for ch in list.chars() {
                    match ch {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            add(item.trim().split("::").next().unwrap_or_default());
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 {
                        item.push(ch);
                    }
                }
                add(item.trim().split("::").next().unwrap_or_default());
            } else {
                let word: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                add(&word);
            }
        }
        graph.insert(m.clone(), out);
    }
    Ok(graph)
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
    let g = imports(&root.join("gateway/src"))?;
    let found = cycles(&g);
    if found.is_empty() {
        println!("layers: {} modules, no import cycle", g.len());
        return Ok(());
    }
    for c in &found {
        println!("layers: these modules import each other in a cycle: {}", c.join(", "));
        for a in c {
            for b in g[a].iter().filter(|b| c.contains(b)) {
                println!("  {a} -> {b}");
            }
        }
    }
    bail!("{} import cycle(s) between the daemon's modules (see ARCHITECTURE.md for the layers)", found.len())
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
    fn reads_paths_and_use_lists_not_comments() {
        let dir = std::env::temp_dir().join(format!("xtask-layers-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.rs"), "use crate::{b::X, c};\n// crate::d\nfn f() { crate::e::g(); }\n").unwrap();
        for m in ["b", "c", "d", "e"] {
            fs::write(dir.join(format!("{m}.rs")), "").unwrap();
        }
        fs::write(dir.join("b.rs"), "#[cfg(test)]\nmod tests { use crate::a; }\n").unwrap();
        let g = imports(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(g["a"], ["b", "c", "e"].into_iter().map(String::from).collect());
        assert!(g["b"].is_empty());
    }
}
