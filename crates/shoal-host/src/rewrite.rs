//! Rewrites a module at load time so that a snapshot can see all of its state, as Wizer
//! does: every mutable global the module defines is exported (as `__shoal_global_N`, N its
//! index), whether or not the module exported it. Nothing else changes: the code, the
//! other exports and the custom sections are copied byte for byte.
//!
//! The same pass notes which pages of linear memory the module's active data segments
//! write at instantiation, so that a restore knows which pages of a fresh instance are not
//! zero.

use wasmparser::{ConstExpr, DataKind, ExternalKind, Operator, Parser, Payload, TypeRef, ValType};

/// The export name of the module's global `index`.
pub fn global_export_name(index: u32) -> String {
    format!("__shoal_global_{index}")
}

/// One mutable global the rewritten module exports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalSlot {
    /// Its index in the module's global index space.
    pub index: u32,
    /// `i32`, `i64`, `f32`, `f64` or `v128`.
    pub ty: &'static str,
}

/// A module prepared for snapshots.
#[derive(Clone, Debug)]
pub struct Rewritten {
    /// The module's bytes with the globals exported.
    pub wasm: Vec<u8>,
    /// The mutable globals it defines, in index order.
    pub globals: Vec<GlobalSlot>,
    /// The 64 KiB pages of memory 0 that active data segments write, sorted; `None` when a
    /// segment's offset is not a constant (then every page must be assumed written).
    pub data_pages: Option<Vec<u32>>,
    /// Whether the module imports a mutable global (whose value lives outside it).
    pub imports_mutable_global: bool,
    /// Memories the module defines, and memories it imports.
    pub memories: (u32, u32),
}

/// Why a module cannot be rewritten.
#[derive(Debug, thiserror::Error)]
#[error("cannot prepare the module for snapshots: {0}")]
pub struct RewriteError(String);

fn bad(e: impl std::fmt::Display) -> RewriteError {
    RewriteError(e.to_string())
}

fn leb(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn section(id: u8, content: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    leb(content.len() as u64, out);
    out.extend_from_slice(content);
}

fn ty_name(t: ValType) -> Option<&'static str> {
    Some(match t {
        ValType::I32 => "i32",
        ValType::I64 => "i64",
        ValType::F32 => "f32",
        ValType::F64 => "f64",
        ValType::V128 => "v128",
        ValType::Ref(_) => return None,
    })
}

fn const_offset(expr: &ConstExpr<'_>) -> Option<u64> {
    let mut ops = expr.get_operators_reader();
    match ops.read().ok()? {
        Operator::I32Const { value } => Some(value as u32 as u64),
        Operator::I64Const { value } => Some(value as u64),
        _ => None,
    }
}

/// Sections that must come after the export section (start, element, data count, code,
/// data): an export section the module lacks is inserted before the first of them.
fn after_exports(id: u8) -> bool {
    matches!(id, 8..=12)
}

/// Exports every mutable global `wasm` defines (see the module docs).
pub fn expose_globals(wasm: &[u8]) -> Result<Rewritten, RewriteError> {
    let mut imported_globals = 0u32;
    let mut imports_mutable_global = false;
    let mut memories = (0u32, 0u32);
    let mut globals = Vec::new();
    let mut data_pages = Some(Vec::new());
    // (id, content range) of every section, in order.
    let mut sections: Vec<(u8, std::ops::Range<usize>)> = Vec::new();
    let mut exports_content: Option<std::ops::Range<usize>> = None;
    let mut export_count = 0u32;
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(bad)?;
        match &payload {
            Payload::Version { encoding, .. } if *encoding != wasmparser::Encoding::Module => {
                return Err(bad("a component, not a core module"));
            }
            Payload::ImportSection(r) => {
                for imp in r.clone().into_imports() {
                    match imp.map_err(bad)?.ty {
                        TypeRef::Global(g) => {
                            imported_globals += 1;
                            imports_mutable_global |= g.mutable;
                        }
                        TypeRef::Memory(_) => memories.1 += 1,
                        _ => {}
                    }
                }
            }
            Payload::MemorySection(r) => {
                memories.0 += r.count();
            }
            Payload::GlobalSection(r) => {
                for (i, g) in r.clone().into_iter().enumerate() {
                    let g = g.map_err(bad)?;
                    if g.ty.mutable {
                        let ty = ty_name(g.ty.content_type).ok_or_else(|| {
                            bad(format!("global {i} holds a reference, which a snapshot cannot keep"))
                        })?;
                        globals.push(GlobalSlot { index: imported_globals + i as u32, ty });
                    }
                }
            }
            Payload::ExportSection(r) => {
                export_count = r.count();
                for e in r.clone() {
                    let e = e.map_err(bad)?;
                    if e.kind == ExternalKind::Global && e.name.starts_with("__shoal_global_") {
                        return Err(bad(format!("the module already exports `{}`, a name shoal reserves", e.name)));
                    }
                }
            }
            Payload::DataSection(r) => {
                for d in r.clone() {
                    let d = d.map_err(bad)?;
                    if let DataKind::Active { memory_index: 0, offset_expr } = &d.kind {
                        match (const_offset(offset_expr), data_pages.as_mut()) {
                            (Some(at), Some(pages)) if !d.data.is_empty() => {
                                let end = at + d.data.len() as u64;
                                pages.extend((at >> 16) as u32..=((end - 1) >> 16) as u32);
                            }
                            (Some(_), _) => {}
                            (None, _) => data_pages = None,
                        }
                    }
                }
            }
            _ => {}
        }
        if let Some((id, range)) = payload.as_section() {
            let range = range.start as usize..range.end as usize;
            if id == 7 {
                exports_content = Some(range.clone());
            }
            sections.push((id, range));
        }
    }
    if let Some(p) = data_pages.as_mut() {
        p.sort_unstable();
        p.dedup();
    }

    // The new export section: the old entries, then one per mutable global.
    let mut content = Vec::new();
    leb(export_count as u64 + globals.len() as u64, &mut content);
    if let Some(r) = &exports_content {
        // Skip the old count (a LEB128 number) and copy the entries.
        let old = &wasm[r.clone()];
        let skip = old.iter().position(|b| b & 0x80 == 0).map_or(0, |i| i + 1);
        content.extend_from_slice(&old[skip..]);
    }
    for g in &globals {
        let name = global_export_name(g.index);
        leb(name.len() as u64, &mut content);
        content.extend_from_slice(name.as_bytes());
        content.push(0x03); // global
        leb(g.index as u64, &mut content);
    }

    let mut out = Vec::with_capacity(wasm.len() + content.len() + 16);
    out.extend_from_slice(&wasm[..8]);
    let mut placed = false;
    for (id, range) in &sections {
        let id = *id;
        if id == 7 {
            section(7, &content, &mut out);
            placed = true;
            continue;
        }
        if !placed && exports_content.is_none() && after_exports(id) {
            section(7, &content, &mut out);
            placed = true;
        }
        section(id, &wasm[range.clone()], &mut out);
    }
    if !placed {
        section(7, &content, &mut out);
    }
    Ok(Rewritten { wasm: out, globals, data_pages, imports_mutable_global, memories })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_every_mutable_global_and_keeps_the_rest() {
        let wat = r#"(module
            (import "env" "g" (global $imp i32))
            (memory (export "memory") 3)
            (global $a (mut i32) (i32.const 7))
            (global $b i64 (i64.const 1))
            (global $c (mut f64) (f64.const 2.5))
            (global $d (mut i64) (i64.const 9))
            (export "d" (global $d))
            (data (i32.const 65530) "0123456789")
            (data (i32.const 131072) "x")
            (func (export "bump") (global.set $a (i32.add (global.get $a) (i32.const 1)))))"#;
        let wasm = wat::parse_str(wat).unwrap();
        let r = expose_globals(&wasm).unwrap();
        let idx: Vec<u32> = r.globals.iter().map(|g| g.index).collect();
        assert_eq!(idx, [1, 3, 4]);
        assert_eq!(r.data_pages, Some(vec![0, 1, 2]));
        let engine = wasmtime::Engine::default();
        let m = wasmtime::Module::new(&engine, &r.wasm).unwrap();
        let names: Vec<&str> = m.exports().map(|e| e.name()).collect();
        assert_eq!(names, ["memory", "d", "bump", "__shoal_global_1", "__shoal_global_3", "__shoal_global_4"]);
    }

    #[test]
    fn a_module_without_exports_gets_an_export_section_in_order() {
        let wasm = wat::parse_str("(module (global (mut i32) (i32.const 1)) (func) (start 0))").unwrap();
        let r = expose_globals(&wasm).unwrap();
        let m = wasmtime::Module::new(&wasmtime::Engine::default(), &r.wasm).unwrap();
        assert_eq!(m.exports().map(|e| e.name().to_string()).collect::<Vec<_>>(), ["__shoal_global_0"]);
        assert!(expose_globals(b"\0asm\x01\0\0\0\x07\x05garbage").is_err());
    }
}
