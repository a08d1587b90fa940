//! Reading SQL text the router must understand without parsing SQL: which statements a
//! query string holds, a case-blind search for words, and the statement-dropping commands
//! (`DISCARD`, `DEALLOCATE`) the router must notice. Quotes, dollar quotes and comments are
//! respected; everything here errs on the side the router can recover from.

/// Whether `hay` starts with `word` (lowercase ASCII), ignoring ASCII case.
pub(crate) fn starts_with_ci(hay: &[u8], word: &[u8]) -> bool {
    hay.len() >= word.len() && hay[..word.len()].eq_ignore_ascii_case(word)
}

/// Whether `hay` contains `needle` (lowercase ASCII), ignoring ASCII case. No allocation,
/// and the candidates come from a SIMD search for the needle's byte at `anchor` (pick one
/// that is rare in SQL): this runs on query text in the hot path.
pub(crate) fn contains_ci(hay: &[u8], needle: &[u8], anchor: usize) -> bool {
    let Some(&a) = needle.get(anchor) else {
        return needle.is_empty();
    };
    if hay.len() < needle.len() {
        return false;
    }
    let candidates = &hay[anchor..=hay.len() - needle.len() + anchor];
    memchr::memchr2_iter(a, a.to_ascii_uppercase(), candidates)
        .any(|i| hay[i..i + needle.len()].eq_ignore_ascii_case(needle))
}

/// The statements of a simple-query string, split at the semicolons outside string
/// literals, quoted identifiers, dollar quotes and comments; trimmed, empty ones dropped.
pub(crate) fn split_statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let (mut out, mut start, mut i) = (Vec::new(), 0, 0);
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // E'...' strings take backslash escapes.
                let escapes = i > 0 && matches!(b[i - 1], b'e' | b'E');
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == b'\'' {
                        if b.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = block_comment_end(b, i),
            b'$' => {
                // $tag$ ... $tag$ (the tag empty or an identifier); $1 is a parameter.
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(e) if b[e] == b'$' && !b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                        let tag = &sql[i..=e];
                        i = match sql[e + 1..].find(tag) {
                            Some(p) => e + 1 + p + tag.len(),
                            None => b.len(),
                        };
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                out.push(&sql[start..i]);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push(&sql[start.min(sql.len())..]);
    out.into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The end of the `/* ... */` comment (they nest) that starts at `start`: the index after
/// it, or the end of `b` if it is not closed.
fn block_comment_end(b: &[u8], start: usize) -> usize {
    let (mut depth, mut i) = (0, start);
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// `sql` without leading whitespace and comments.
fn skip_blank(mut sql: &str) -> &str {
    loop {
        sql = sql.trim_start();
        if let Some(rest) = sql.strip_prefix("--") {
            sql = rest.split_once('\n').map_or("", |(_, r)| r);
        } else if sql.starts_with("/*") {
            sql = &sql[block_comment_end(sql.as_bytes(), 0)..];
        } else {
            return sql;
        }
    }
}

/// Whether `stmt` begins with the keyword `word` (lowercase ASCII).
fn keyword(stmt: &str, word: &str) -> bool {
    starts_with_ci(stmt.as_bytes(), word.as_bytes())
        && !stmt
            .as_bytes()
            .get(word.len())
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Whether the word `DISCARD` or `DEALLOCATE` occurs anywhere in `query` (any case): one
/// SIMD pass over its d's. Nearly always false, and then nothing more is read: this runs for
/// every query.
#[inline]
pub(crate) fn mentions_dropping(query: &[u8]) -> bool {
    memchr::memchr2_iter(b'd', b'D', query).any(|i| {
        starts_with_ci(&query[i..], b"discard") || starts_with_ci(&query[i..], b"deallocate")
    })
}

/// Whether running `query`, which [`mentions_dropping`], may drop prepared statements of the
/// session: a statement of it starts with `DISCARD` or `DEALLOCATE`.
pub(crate) fn drops_statements_exactly(query: &[u8]) -> bool {
    let Ok(sql) = std::str::from_utf8(query) else {
        return true;
    };
    split_statements(sql).into_iter().any(|stmt| {
        let stmt = skip_blank(stmt);
        keyword(stmt, "discard") || keyword(stmt, "deallocate")
    })
}

/// A `DEALLOCATE` command on its own.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Deallocate {
    All,
    /// The statement name as Postgres reads it: folded to lower case unless quoted.
    Name(String),
}

/// `query` when it is exactly one `DEALLOCATE [PREPARE] name | ALL` (and a terminating NUL
/// or semicolons are allowed). A query that starts with anything but `d`, a comment or
/// whitespace is turned down at its first byte.
pub(crate) fn deallocate(query: &[u8]) -> Option<Deallocate> {
    if !matches!(
        query.first(),
        Some(b'd' | b'D' | b'/' | b'-') | Some(b' ' | b'\t' | b'\n' | b'\r')
    ) {
        return None;
    }
    let sql = std::str::from_utf8(query).ok()?.trim_end_matches('\0');
    let [stmt] = split_statements(sql)[..] else {
        return None;
    };
    let stmt = skip_blank(stmt);
    if !keyword(stmt, "deallocate") {
        return None;
    }
    let mut rest = skip_blank(&stmt["deallocate".len()..]);
    if keyword(rest, "prepare") {
        rest = skip_blank(&rest["prepare".len()..]);
    }
    let (name, after) = if let Some(q) = rest.strip_prefix('"') {
        // "a""b" is a"b
        let mut name = String::new();
        let mut chars = q.char_indices().peekable();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if chars.peek().map(|(_, c)| *c) == Some('"') {
                    chars.next();
                    name.push('"');
                    continue;
                }
                end = Some(i + 1);
                break;
            }
            name.push(c);
        }
        (Deallocate::Name(name), &q[end?..])
    } else {
        let len = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(rest.len());
        if len == 0 {
            return None;
        }
        let word = &rest[..len];
        let name = if word.eq_ignore_ascii_case("all") {
            Deallocate::All
        } else {
            // Postgres folds unquoted identifiers' ASCII letters only.
            Deallocate::Name(word.to_ascii_lowercase())
        };
        (name, &rest[len..])
    };
    skip_blank(after).is_empty().then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_ci_agrees_with_a_plain_search_for_every_anchor() {
        let naive = |hay: &[u8], needle: &[u8]| {
            hay.to_ascii_lowercase()
                .windows(needle.len())
                .any(|w| w == needle)
        };
        let hays: [&[u8]; 7] = [
            b"SELECT pg_advisory_lock(1)",
            b"select PG_ADVISORY_LOCK(1)",
            b"pg_advisory_lock(",
            b"pg_advisory_lock",
            b"x pg_advisory_lockpg_advisory_lock( y",
            b"select abalance from pgbench_accounts where aid = 1",
            b"",
        ];
        let needle = b"pg_advisory_lock(";
        for hay in hays {
            for anchor in 0..needle.len() {
                assert_eq!(
                    contains_ci(hay, needle, anchor),
                    naive(hay, needle),
                    "{:?} anchor {anchor}",
                    String::from_utf8_lossy(hay)
                );
            }
        }
    }

    #[test]
    fn statements_split_outside_quotes_and_comments() {
        assert_eq!(
            split_statements(
                "select ';'; select \"a;b\" from t /* ; /* ; */ ; */ ; select $$;$$, $f$ ; $f$, $1 ;select E'\\';' -- ;\n; ;"
            ),
            [
                "select ';'",
                "select \"a;b\" from t /* ; /* ; */ ; */",
                "select $$;$$, $f$ ; $f$, $1",
                "select E'\\';' -- ;",
            ]
        );
    }

    #[test]
    fn statement_dropping_commands() {
        let drops_statements = |q: &[u8]| mentions_dropping(q) && drops_statements_exactly(q);
        for q in [
            "DISCARD ALL",
            "select 1; deallocate all",
            "  /* pool reset */ discard all",
            "-- reset\nDEALLOCATE pr_1",
            "Deallocate prepare s1;",
        ] {
            assert!(drops_statements(q.as_bytes()), "{q}");
        }
        for q in [
            "select discarded_at, deallocated from t",
            "select 'discard all'",
            "select 1 -- deallocate all",
            "update t set note = $$ ; discard all $$",
            "select deallocate_count from t",
        ] {
            assert!(!drops_statements(q.as_bytes()), "{q}");
        }
    }

    #[test]
    fn deallocate_commands() {
        let name = |s: &str| Some(Deallocate::Name(s.to_owned()));
        assert_eq!(deallocate(b"DEALLOCATE _pg3_0"), name("_pg3_0"));
        assert_eq!(deallocate(b"deallocate prepare S_1;"), name("s_1"));
        assert_eq!(deallocate(b"DEALLOCATE \"S_1\"\0"), name("S_1"));
        assert_eq!(deallocate(b"DEALLOCATE \"a\"\"b\" ; "), name("a\"b"));
        assert_eq!(deallocate(b"deallocate ALL"), Some(Deallocate::All));
        assert_eq!(
            deallocate(b"/* x */ deallocate all;"),
            Some(Deallocate::All)
        );
        assert_eq!(deallocate(b"deallocate prepare all"), Some(Deallocate::All));
        for q in [
            "deallocate",
            "deallocate a b",
            "deallocate a; select 1",
            "select 1; deallocate a",
            "deallocated a",
            "deallocate \"unterminated",
        ] {
            assert_eq!(deallocate(q.as_bytes()), None, "{q}");
        }
    }
}
