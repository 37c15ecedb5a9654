//! The pickle reader on real pickles (a bundled AOTAutograd artifact as torch.compile made it,
//! dates and a list at every protocol) and on damaged ones: it names the class, or says what
//! is wrong and where, and never runs anything.

use torch_pickle::{check, pickle, BUNDLED_CLASS};

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn real_pickles_are_read_and_their_class_named() {
    let bundled = pickle::read(&fixture("bundled.pickle")).unwrap();
    assert_eq!(bundled.protocol, 5);
    assert_eq!(bundled.class.as_deref(), Some(BUNDLED_CLASS));
    for p in 2..=5 {
        let date = pickle::read(&fixture(&format!("date_p{p}.pickle"))).unwrap();
        assert_eq!(date.protocol, p);
        assert_eq!(date.class.as_deref(), Some("datetime.date"), "protocol {p}");
    }
    assert_eq!(
        pickle::read(&fixture("list_p4.pickle")).unwrap().class,
        None
    );
}

#[test]
fn the_bundled_kind_takes_only_torchs_bundled_artifacts() {
    let described = check("torch.bundled_aot_autograd", &fixture("bundled.pickle")).unwrap();
    assert!(described.contains(BUNDLED_CLASS), "{described}");
    assert!(described.contains("\"size\":67132"), "{described}");
    let e = check("torch.bundled_aot_autograd", &fixture("date_p4.pickle")).unwrap_err();
    assert!(
        e.contains("datetime.date") && e.contains("torch.pickle"),
        "{e}"
    );
    assert!(check("torch.pickle", &fixture("date_p4.pickle")).is_ok());
}

#[test]
fn damaged_pickles_are_refused_saying_where() {
    let good = fixture("bundled.pickle");
    // Cut short anywhere: never read as whole.
    for cut in [1, 2, 11, 12, 100, good.len() / 2, good.len() - 1] {
        let e = pickle::read(&good[..cut]).unwrap_err();
        assert!(!e.is_empty(), "cut at {cut}");
    }
    // Bytes after STOP.
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"xyz");
    assert!(pickle::read(&trailing)
        .unwrap_err()
        .contains("3 bytes follow"));
    // A frame that claims more than there is.
    let mut lying = good.clone();
    lying[3..11].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(pickle::read(&lying)
        .unwrap_err()
        .contains("FRAME at byte 2"));
    // An opcode that does not exist.
    let mut bad = fixture("date_p4.pickle");
    let last = bad.len() - 1;
    bad.insert(last, 0xff);
    assert!(pickle::read(&bad).unwrap_err().contains("no pickle opcode"));
    // No PROTO: protocol 0/1 pickles (and anything else) are refused.
    assert!(pickle::read(b"N.").unwrap_err().contains("PROTO"));
    assert!(pickle::read(b"").is_err());
    assert!(pickle::read(b"\x80\x09N.")
        .unwrap_err()
        .contains("protocol 9"));
}
