//! Guest memories created by `GuestMemoryCreator`, driven by real Wasm guests:
//! the base never moves, every committed range and the release reach the observer,
//! out-of-bounds loads still trap, and an observer that refuses a range makes
//! `memory.grow` fail without harming the guest.

#![cfg(unix)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use shoal_memory::{CommittedRange, GuestMemoryCreator, MemoryId, MemoryObserver};
use wasmtime::{Config, Engine, Instance, Memory, Module, Store, Trap, TypedFunc};

const PAGE: usize = 65536;

/// What the observer was told, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    /// A committed range, and whether the observer accepted it.
    Committed(CommittedRange, bool),
    /// A release: memory, base, committed length, and the first and last committed
    /// bytes as they read at the time of the call (the pages must still be mapped).
    Released { memory: MemoryId, base: usize, len: usize, first: u8, last: u8 },
}

/// Records every call; refuses committed ranges while `refuse` is set.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    refuse: AtomicBool,
}

impl Recorder {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
    fn committed(&self) -> Vec<CommittedRange> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Committed(r, true) => Some(r),
                _ => None,
            })
            .collect()
    }
    fn releases(&self) -> Vec<Event> {
        self.events().into_iter().filter(|e| matches!(e, Event::Released { .. })).collect()
    }
}

impl MemoryObserver for Recorder {
    fn committed(&self, range: CommittedRange) -> Result<(), String> {
        let refuse = self.refuse.load(Ordering::SeqCst);
        self.events.lock().unwrap().push(Event::Committed(range, !refuse));
        if refuse { Err("the test observer refuses this range".into()) } else { Ok(()) }
    }

    fn released(&self, memory: MemoryId, base: usize, len: usize) {
        let (first, last) = if len > 0 {
            // SAFETY: the observer contract says every committed page is still mapped
            // (readable) until `released` returns; `base..base+len` is exactly what was
            // committed. If the memory broke the contract this read faults and the
            // test fails loudly, which is the point.
            unsafe {
                (std::ptr::read_volatile(base as *const u8), std::ptr::read_volatile((base + len - 1) as *const u8))
            }
        } else {
            (0, 0)
        };
        self.events.lock().unwrap().push(Event::Released { memory, base, len, first, last });
    }
}

const WAT: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "grow") (param $pages i32) (result i32)
    (memory.grow (local.get $pages)))
  (func (export "size") (result i32)
    (memory.size))
  (func (export "load") (param $at i32) (result i32)
    (i32.load (local.get $at)))
  (func (export "store8") (param $at i32) (param $v i32)
    (i32.store8 (local.get $at) (local.get $v))))
"#;

struct Guest {
    store: Store<()>,
    memory: Memory,
    grow: TypedFunc<i32, i32>,
    size: TypedFunc<(), i32>,
    load: TypedFunc<i32, i32>,
    store8: TypedFunc<(i32, i32), ()>,
}

fn engine(observer: Arc<Recorder>) -> Engine {
    let mut config = Config::new();
    GuestMemoryCreator::configure(&mut config, observer);
    Engine::new(&config).expect("engine")
}

fn instantiate(engine: &Engine, wat: &str) -> wasmtime::Result<(Store<()>, Instance)> {
    let module = Module::new(engine, wat)?;
    let mut store = Store::new(engine, ());
    let instance = Instance::new(&mut store, &module, &[])?;
    Ok((store, instance))
}

fn guest(engine: &Engine) -> Guest {
    let (mut store, instance) = instantiate(engine, WAT).expect("instantiate");
    let memory = instance.get_memory(&mut store, "memory").expect("memory export");
    let grow = instance.get_typed_func(&mut store, "grow").unwrap();
    let size = instance.get_typed_func(&mut store, "size").unwrap();
    let load = instance.get_typed_func(&mut store, "load").unwrap();
    let store8 = instance.get_typed_func(&mut store, "store8").unwrap();
    Guest { store, memory, grow, size, load, store8 }
}

impl Guest {
    fn grow(&mut self, pages: i32) -> i32 {
        self.grow.call(&mut self.store, pages).expect("memory.grow does not trap")
    }
    fn pages(&mut self) -> i32 {
        self.size.call(&mut self.store, ()).unwrap()
    }
    fn load(&mut self, at: u32) -> Result<i32, wasmtime::Error> {
        self.load.call(&mut self.store, at as i32)
    }
    fn ptr(&self) -> *mut u8 {
        self.memory.data_ptr(&self.store)
    }
    fn bytes(&self) -> usize {
        self.memory.data_size(&self.store)
    }
}

fn assert_oob_trap(r: Result<i32, wasmtime::Error>, what: &str) {
    match r {
        Ok(v) => panic!("{what}: the load returned {v} instead of trapping"),
        Err(e) => assert_eq!(
            e.downcast_ref::<Trap>(),
            Some(&Trap::MemoryOutOfBounds),
            "{what}: expected an out-of-bounds trap, got {e:?}"
        ),
    }
}

#[test]
fn growth_keeps_the_base_and_grows_the_size() {
    let recorder = Arc::new(Recorder::default());
    let engine = engine(recorder.clone());
    let mut g = guest(&engine);
    let base = g.ptr();
    assert!(!base.is_null());
    assert_eq!(base as usize % shoal_memory::page_size(), 0, "the base is page-aligned: {base:p}");
    assert_eq!(g.bytes(), PAGE);
    assert_eq!(g.pages(), 1);

    let mut pages = 1;
    for step in [1, 3, 1, 10, 2] {
        assert_eq!(g.grow(step), pages, "memory.grow returns the old size in pages");
        pages += step;
        assert_eq!(g.ptr(), base, "the base moved after growing to {pages} pages");
        assert_eq!(g.bytes(), pages as usize * PAGE);
        assert_eq!(g.pages(), pages);
    }
    // Growing by zero is a no-op that still reports the size.
    assert_eq!(g.grow(0), pages);
    assert_eq!(g.ptr(), base);

    // The host's view and the guest's view are the same bytes, also in a grown page.
    let at = (pages as usize - 1) * PAGE + 12;
    // SAFETY: `at + 4 <= data_size`, the memory is live, and no guest code runs
    // while we write.
    unsafe { (g.ptr().add(at) as *mut u32).write_unaligned(0xdead_beef) };
    assert_eq!(g.load(at as u32).unwrap() as u32, 0xdead_beef);

    // Growth from the host side uses the same creator.
    assert_eq!(g.memory.grow(&mut g.store, 2).unwrap(), pages as u64);
    assert_eq!(g.ptr(), base);
    assert_eq!(g.bytes(), (pages as usize + 2) * PAGE);
}

#[test]
fn the_observer_sees_every_committed_range_and_one_release() {
    let recorder = Arc::new(Recorder::default());
    let engine = engine(recorder.clone());
    let mut g = guest(&engine);
    let base = g.ptr() as usize;
    let steps: [usize; 4] = [1, 2, 5, 1];
    for step in steps {
        assert_ne!(g.grow(step as i32), -1);
    }
    assert_eq!(g.grow(0), 10, "growing by 0 pages commits nothing");
    let total = g.bytes();
    assert_eq!(total, 10 * PAGE);

    let ranges = recorder.committed();
    assert_eq!(ranges.len(), 1 + steps.len(), "one range at instantiation and one per grow: {ranges:#?}");
    let id = ranges[0].memory;
    let mut expect_offset = 0;
    for (r, pages) in ranges.iter().zip([1].into_iter().chain(steps)) {
        assert_eq!(r.memory, id, "all ranges belong to one memory");
        assert_eq!(r.base, base, "ranges name the memory's base");
        assert_eq!(r.offset, expect_offset, "ranges are contiguous: {ranges:#?}");
        assert_eq!(r.len, pages * PAGE, "each range is exactly the growth");
        assert_eq!(r.start_addr(), base + expect_offset);
        expect_offset += r.len;
    }
    assert_eq!(expect_offset, total);
    assert!(recorder.releases().is_empty(), "nothing is released while the store lives");

    // Markers at the first and last committed bytes, read back by the observer at release.
    g.store8.call(&mut g.store, (0, 0x5a)).unwrap();
    g.store8.call(&mut g.store, (total as i32 - 1, 0xa5)).unwrap();

    drop(g);
    let releases = recorder.releases();
    assert_eq!(
        releases,
        vec![Event::Released { memory: id, base, len: total, first: 0x5a, last: 0xa5 }],
        "released exactly once, with the base and the committed length, pages still mapped"
    );
    // And nothing after the release.
    assert!(matches!(recorder.events().last(), Some(Event::Released { .. })));
}

#[test]
fn each_memory_gets_its_own_id_and_release() {
    let recorder = Arc::new(Recorder::default());
    let engine = engine(recorder.clone());
    let a = guest(&engine);
    let b = guest(&engine);
    let (base_a, base_b) = (a.ptr() as usize, b.ptr() as usize);
    assert_ne!(base_a, base_b);
    let ranges = recorder.committed();
    assert_eq!(ranges.len(), 2);
    assert_ne!(ranges[0].memory, ranges[1].memory, "two memories, two ids");
    drop(a);
    let rel = recorder.releases();
    assert_eq!(rel.len(), 1);
    assert!(matches!(rel[0], Event::Released { base, .. } if base == base_a), "{rel:?}");
    drop(b);
    let rel = recorder.releases();
    assert_eq!(rel.len(), 2);
    assert!(matches!(rel[1], Event::Released { base, .. } if base == base_b), "{rel:?}");
}

#[test]
fn out_of_bounds_loads_still_trap() {
    let recorder = Arc::new(Recorder::default());
    let engine = engine(recorder);
    let mut g = guest(&engine);
    let size = g.bytes() as u32;
    assert_eq!(g.load(size - 4).unwrap(), 0, "the last word is readable");
    assert_oob_trap(g.load(size), "a load at the current size");
    assert_oob_trap(g.load(size - 2), "a load straddling the end");
    assert_oob_trap(g.load(size + 4096), "a load a page past the end");
    assert_oob_trap(g.load(3 * PAGE as u32), "a load pages past the end");
    assert_oob_trap(g.load(0xffff_fffc), "a load at the top of the 4 GiB space");
    // The guest keeps running after a trap.
    assert_eq!(g.load(0).unwrap(), 0);

    // Just past the end traps before a grow, and is readable after it.
    assert_oob_trap(g.load(PAGE as u32), "before growing");
    assert_eq!(g.grow(1), 1);
    assert_eq!(g.load(PAGE as u32).unwrap(), 0, "after growing, the new page reads zero");
    assert_eq!(g.load(2 * PAGE as u32 - 4).unwrap(), 0);
    assert_oob_trap(g.load(2 * PAGE as u32), "at the new size");
}

#[test]
fn a_refused_range_makes_memory_grow_fail_and_the_guest_goes_on() {
    let recorder = Arc::new(Recorder::default());
    let engine = engine(recorder.clone());
    let mut g = guest(&engine);
    let base = g.ptr();
    assert_eq!(recorder.committed().len(), 1);

    recorder.refuse.store(true, Ordering::SeqCst);
    assert_eq!(g.grow(1), -1, "memory.grow reports the refusal as -1");
    assert_eq!(g.grow(4), -1);
    assert_eq!(g.pages(), 1, "the size is unchanged");
    assert_eq!(g.bytes(), PAGE);
    assert_eq!(g.ptr(), base);
    assert_oob_trap(g.load(PAGE as u32), "the refused page is not accessible");
    let refused: Vec<_> = recorder.events().into_iter().filter(|e| matches!(e, Event::Committed(_, false))).collect();
    assert_eq!(refused.len(), 2, "the observer was asked twice: {refused:?}");

    // The guest keeps running, and the memory grows again once the observer accepts.
    assert_eq!(g.load(0).unwrap(), 0);
    recorder.refuse.store(false, Ordering::SeqCst);
    assert_eq!(g.grow(1), 1);
    assert_eq!(g.pages(), 2);
    assert_eq!(g.ptr(), base);
    assert_eq!(g.load(PAGE as u32).unwrap(), 0);
    let ranges = recorder.committed();
    assert_eq!(ranges.len(), 2);
    assert_eq!((ranges[1].offset, ranges[1].len), (PAGE, PAGE), "the accepted range follows the first one");

    drop(g);
    let rel = recorder.releases();
    assert!(
        matches!(rel.as_slice(), [Event::Released { len, .. }] if *len == 2 * PAGE),
        "the release covers only what was accepted: {rel:?}"
    );
}

#[test]
fn growth_past_the_declared_maximum_fails_without_asking_the_observer() {
    let recorder = Arc::new(Recorder::default());
    let engine = engine(recorder.clone());
    let wat = r#"(module (memory (export "memory") 1 2)
        (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0))))"#;
    let (mut store, instance) = instantiate(&engine, wat).unwrap();
    let grow = instance.get_typed_func::<i32, i32>(&mut store, "grow").unwrap();
    let memory = instance.get_memory(&mut store, "memory").unwrap();
    let base = memory.data_ptr(&store);
    assert_eq!(grow.call(&mut store, 2).unwrap(), -1, "1 + 2 pages exceeds the maximum of 2");
    assert_eq!(grow.call(&mut store, 1).unwrap(), 1);
    assert_eq!(grow.call(&mut store, 1).unwrap(), -1);
    assert_eq!(memory.data_size(&store), 2 * PAGE);
    assert_eq!(memory.data_ptr(&store), base);
    assert_eq!(recorder.committed().len(), 2, "only the successful grow was announced");
}

#[test]
fn a_refused_initial_range_fails_instantiation() {
    let recorder = Arc::new(Recorder::default());
    recorder.refuse.store(true, Ordering::SeqCst);
    let engine = engine(recorder.clone());
    let err = match instantiate(&engine, WAT) {
        Ok(_) => panic!("instantiation succeeded although the observer refused the memory"),
        Err(e) => e,
    };
    assert!(format!("{err:#}").contains("refuses"), "the observer's reason is in the error: {err:#}");
    assert!(recorder.committed().is_empty());
}

#[test]
fn a_released_memory_is_reused_zeroed_and_shrunk_to_the_new_size() {
    let recorder = Arc::new(Recorder::default());
    let engine = engine(recorder.clone());
    let mut a = guest(&engine);
    assert_ne!(a.grow(9), -1);
    let (base, total) = (a.ptr() as usize, a.bytes());
    for at in [0, PAGE + 17, total - 1] {
        a.store8.call(&mut a.store, (at as i32, 0x77)).unwrap();
    }
    let first = recorder.committed()[0].memory;
    drop(a);
    assert_eq!(recorder.releases().len(), 1, "released to the observer before it is kept");

    // The next memory of the same reservation takes the kept one: same pages, all zero,
    // only its own size accessible, announced as a new memory.
    let mut b = guest(&engine);
    assert_eq!(b.ptr() as usize, base, "the kept reservation is reused");
    assert_eq!(b.bytes(), PAGE);
    assert_eq!(b.load(0).unwrap(), 0, "what the last guest wrote is gone");
    assert_oob_trap(b.load(PAGE as u32 + 16), "a page the last guest had, past this one's size");
    assert_oob_trap(b.load(total as u32 - 4), "the last guest's last page");
    assert_eq!(b.grow(9), 1);
    assert_eq!(b.load(PAGE as u32 + 16).unwrap(), 0, "grown again, the page reads zero");
    assert_eq!(b.load(total as u32 - 4).unwrap(), 0);
    let ranges = recorder.committed();
    let last = ranges.iter().rev().find(|r| r.offset == 0).unwrap();
    assert_ne!(last.memory, first, "a reused reservation is a new memory to the observer");
    assert_eq!(last.base, base);
    drop(b);
    assert_eq!(recorder.releases().len(), 2);
}
