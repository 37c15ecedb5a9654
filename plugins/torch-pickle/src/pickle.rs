//! Reading a Python pickle without running it: every opcode is checked against the bytes
//! (its argument within them, frames as long as they say, one `STOP` exactly at the end), and
//! a small model of the pickle machine's stack says which class the top-level object is made
//! from. Nothing is imported, called or built: a class is only a name here.
//!
//! The opcodes are those of pickle protocols 2 to 5 (CPython's `Lib/pickletools.py` lists
//! them); protocol 0 and 1 pickles, which have no `PROTO` opcode, are refused, as PyTorch
//! writes protocol 2 or later.

use std::collections::HashMap;

/// What a pickle holds, as far as can be told without running it.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub protocol: u8,
    /// `module.qualname` of the class the top-level object is made from, if it is made by
    /// calling a class (REDUCE, NEWOBJ, NEWOBJ_EX, OBJ, INST).
    pub class: Option<String>,
    pub opcodes: usize,
}

/// A stack item of the model.
#[derive(Clone, Debug)]
enum Item {
    Mark,
    Str(String),
    Class(String),
    Object(Option<String>),
    Other,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let out = &self.bytes[self.at..end];
                self.at = end;
                Ok(out)
            }
            None => Err(format!(
                "the {what} at byte {} needs {n} bytes, but the pickle ends at byte {}",
                self.at,
                self.bytes.len()
            )),
        }
    }

    fn uint(&mut self, n: usize, what: &str) -> Result<u64, String> {
        let b = self.take(n, what)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Ok(u64::from_le_bytes(v))
    }

    /// A length-prefixed argument: its `n`-byte little-endian length, then that many bytes.
    fn counted(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let len = self.uint(n, what)?;
        let len = usize::try_from(len).map_err(|_| format!("the {what} is too long"))?;
        self.take(len, what)
    }

    /// A newline-terminated argument (text opcodes of protocol 0, still allowed later).
    fn line(&mut self, what: &str) -> Result<&'a [u8], String> {
        let rest = &self.bytes[self.at..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.at += n + 1;
                Ok(&rest[..n])
            }
            None => Err(format!(
                "the {what} at byte {} has no end of line before the pickle ends",
                self.at
            )),
        }
    }
}

fn text(bytes: &[u8], what: &str, at: usize) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("the {what} at byte {at} is not UTF-8"))
}

/// Reads `bytes` as one pickle; says what is wrong and where, or what it holds.
pub fn read(bytes: &[u8]) -> Result<Summary, String> {
    let mut r = Reader { bytes, at: 0 };
    let mut stack: Vec<Item> = Vec::new();
    let mut memo: HashMap<u64, Item> = HashMap::new();
    let mut opcodes = 0usize;
    let mut protocol = None;
    let mut frame_end: Option<usize> = None;
    loop {
        let at = r.at;
        if let Some(end) = frame_end {
            if at > end {
                return Err(format!(
                    "an opcode runs past the end of its frame (byte {end}) to byte {at}"
                ));
            }
            if at == end {
                frame_end = None;
            }
        }
        let op = *r
            .take(1, "opcode")
            .map_err(|_| format!("the pickle ends at byte {at} without a STOP opcode"))?
            .first()
            .unwrap_or(&0);
        opcodes += 1;
        if opcodes == 1 && op != 0x80 {
            return Err(
                "the pickle does not begin with a PROTO opcode (protocol 2 or later)".into(),
            );
        }
        let pop = |stack: &mut Vec<Item>, what: &str| {
            stack
                .pop()
                .ok_or_else(|| format!("{what} at byte {at} pops an empty stack"))
        };
        let pop_mark = |stack: &mut Vec<Item>, what: &str| -> Result<Vec<Item>, String> {
            let Some(mark) = stack.iter().rposition(|i| matches!(i, Item::Mark)) else {
                return Err(format!("{what} at byte {at} finds no MARK on the stack"));
            };
            let items = stack.split_off(mark + 1);
            stack.pop();
            Ok(items)
        };
        match op {
            0x80 => {
                let v = r.uint(1, "PROTO version")? as u8;
                if !(2..=5).contains(&v) {
                    return Err(format!(
                        "PROTO at byte {at} names protocol {v}: 2 to 5 are read"
                    ));
                }
                if protocol.is_some() {
                    return Err(format!("a second PROTO at byte {at}"));
                }
                protocol = Some(v);
            }
            0x95 => {
                let len = r.uint(8, "FRAME length")?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| r.at.checked_add(l))
                    .filter(|&e| e <= bytes.len())
                    .ok_or_else(|| {
                        format!(
                            "the FRAME at byte {at} says {len} bytes follow, but only {} do",
                            bytes.len() - r.at
                        )
                    })?;
                frame_end = Some(end);
            }
            b'.' => {
                if r.at != bytes.len() {
                    return Err(format!(
                        "STOP at byte {at}, but {} bytes follow it",
                        bytes.len() - r.at
                    ));
                }
                let top = pop(&mut stack, "STOP")?;
                if !stack.is_empty() {
                    return Err(format!(
                        "STOP at byte {at} leaves {} items besides the result",
                        stack.len()
                    ));
                }
                let class = match top {
                    Item::Object(c) => c,
                    _ => None,
                };
                return Ok(Summary {
                    protocol: protocol.unwrap_or(0),
                    class,
                    opcodes,
                });
            }
            b'(' => stack.push(Item::Mark),
            b'0' => drop(pop(&mut stack, "POP")?),
            b'1' => drop(pop_mark(&mut stack, "POP_MARK")?),
            b'2' => {
                let top = pop(&mut stack, "DUP")?;
                stack.push(top.clone());
                stack.push(top);
            }
            b'N' | 0x88 | 0x89 | b')' | b']' | b'}' | 0x8f => stack.push(Item::Other),
            b'J' => drop(r.take(4, "BININT")?),
            b'K' => drop(r.take(1, "BININT1")?),
            b'M' => drop(r.take(2, "BININT2")?),
            b'G' => drop(r.take(8, "BINFLOAT")?),
            b'I' | b'F' | b'L' => drop(r.line("number")?),
            0x8a => drop(r.counted(1, "LONG1")?),
            0x8b => drop(r.counted(4, "LONG4")?),
            b'S' => drop(r.line("STRING")?),
            b'V' => {
                let s = r.line("UNICODE")?;
                stack.push(Item::Str(text(s, "UNICODE", at)?));
                continue;
            }
            b'T' => drop(r.counted(4, "BINSTRING")?),
            b'U' => drop(r.counted(1, "SHORT_BINSTRING")?),
            b'B' => drop(r.counted(4, "BINBYTES")?),
            b'C' => drop(r.counted(1, "SHORT_BINBYTES")?),
            0x8e => drop(r.counted(8, "BINBYTES8")?),
            0x96 => drop(r.counted(8, "BYTEARRAY8")?),
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    0x8c => 1,
                    b'X' => 4,
                    _ => 8,
                };
                let s = r.counted(n, "string")?;
                stack.push(Item::Str(text(s, "string", at)?));
                continue;
            }
            b'P' => drop(r.line("PERSID")?),
            b'Q' => {
                pop(&mut stack, "BINPERSID")?;
                stack.push(Item::Other);
                continue;
            }
            0x82 => drop(r.take(1, "EXT1")?),
            0x83 => drop(r.take(2, "EXT2")?),
            0x84 => drop(r.take(4, "EXT4")?),
            0x97 => {}
            0x98 => {
                pop(&mut stack, "READONLY_BUFFER")?;
                stack.push(Item::Other);
                continue;
            }
            b'c' | b'i' => {
                let module = text(r.line("module name")?, "module name", at)?;
                let name = text(r.line("class name")?, "class name", at)?;
                let class = format!("{module}.{name}");
                if op == b'c' {
                    stack.push(Item::Class(class));
                } else {
                    pop_mark(&mut stack, "INST")?;
                    stack.push(Item::Object(Some(class)));
                }
                continue;
            }
            0x93 => {
                let name = pop(&mut stack, "STACK_GLOBAL")?;
                let module = pop(&mut stack, "STACK_GLOBAL")?;
                match (module, name) {
                    (Item::Str(m), Item::Str(n)) => stack.push(Item::Class(format!("{m}.{n}"))),
                    _ => stack.push(Item::Class(String::new())),
                }
                continue;
            }
            b'R' | 0x81 => {
                pop(&mut stack, "REDUCE/NEWOBJ")?;
                let callable = pop(&mut stack, "REDUCE/NEWOBJ")?;
                stack.push(Item::Object(class_of(callable)));
                continue;
            }
            0x92 => {
                pop(&mut stack, "NEWOBJ_EX")?;
                pop(&mut stack, "NEWOBJ_EX")?;
                let cls = pop(&mut stack, "NEWOBJ_EX")?;
                stack.push(Item::Object(class_of(cls)));
                continue;
            }
            b'o' => {
                let mut items = pop_mark(&mut stack, "OBJ")?.into_iter();
                let cls = items
                    .next()
                    .ok_or_else(|| format!("OBJ at byte {at} has no class"))?;
                stack.push(Item::Object(class_of(cls)));
                continue;
            }
            b'b' | b'a' => drop(pop(&mut stack, "BUILD/APPEND")?),
            b's' => {
                pop(&mut stack, "SETITEM")?;
                pop(&mut stack, "SETITEM")?;
            }
            b'e' | b'u' | 0x90 => drop(pop_mark(&mut stack, "APPENDS/SETITEMS/ADDITEMS")?),
            b'l' | b'd' | b't' | 0x91 => {
                pop_mark(&mut stack, "LIST/DICT/TUPLE/FROZENSET")?;
                stack.push(Item::Other);
            }
            0x85..=0x87 => {
                for _ in 0..(op - 0x84) {
                    pop(&mut stack, "TUPLE1/2/3")?;
                }
                stack.push(Item::Other);
            }
            b'p' | b'q' | b'r' | 0x94 => {
                let index = match op {
                    b'p' => parse_index(r.line("PUT index")?, at)?,
                    b'q' => r.uint(1, "BINPUT index")?,
                    b'r' => r.uint(4, "LONG_BINPUT index")?,
                    _ => memo.len() as u64,
                };
                let top = stack
                    .last()
                    .cloned()
                    .ok_or_else(|| format!("a memo store at byte {at} with an empty stack"))?;
                memo.insert(index, top);
            }
            b'g' | b'h' | b'j' => {
                let index = match op {
                    b'g' => parse_index(r.line("GET index")?, at)?,
                    b'h' => r.uint(1, "BINGET index")?,
                    _ => r.uint(4, "LONG_BINGET index")?,
                };
                let item = memo.get(&index).cloned().ok_or_else(|| {
                    format!("a memo get at byte {at} of index {index}, never stored")
                })?;
                stack.push(item);
            }
            other => {
                return Err(format!(
                    "byte {at} holds 0x{other:02x}, which is no pickle opcode"
                ))
            }
        }
        // Opcodes not handled above push nothing or a value of no interest.
        if matches!(
            op,
            b'J' | b'K'
                | b'M'
                | b'G'
                | b'I'
                | b'F'
                | b'L'
                | 0x8a
                | 0x8b
                | b'S'
                | b'T'
                | b'U'
                | b'B'
                | b'C'
                | 0x8e
                | 0x96
                | b'P'
                | 0x82
                | 0x83
                | 0x84
                | 0x97
        ) {
            stack.push(Item::Other);
        }
    }
}

fn class_of(item: Item) -> Option<String> {
    match item {
        Item::Class(c) if !c.is_empty() => Some(c),
        _ => None,
    }
}

fn parse_index(line: &[u8], at: usize) -> Result<u64, String> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("the memo index at byte {at} is not a number"))
}
