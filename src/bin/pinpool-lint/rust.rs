//! SQL in Rust sources: the string literals passed as the SQL argument of the query calls of
//! tokio-postgres, pinpool, sqlx and diesel.
//!
//! A method call is matched by its name and number of arguments (the receiver's type is not
//! known); a function or macro call by the last segment of its path. Only a string literal
//! (plain or raw, or a `concat!` of literals) is read as SQL, which keeps false alarms low,
//! also where a name stands for one: a `let` binding in scope (not `mut`, not shadowed since)
//! or a `const` or `static` of the same file. A query call whose SQL argument is anything else
//! is counted as not checked. Macro bodies are read too: those of sqlx's query macros by their
//! known shape, any other one as comma-separated expressions, as statements, or else piece by
//! piece; one that parses in none of these ways is skipped, never an error.

use std::collections::{HashMap, HashSet};

use proc_macro2::{Spacing, Span, TokenStream, TokenTree};
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::visit::{self, Visit};
use syn::{Block, Expr, ExprCall, ExprMethodCall, Lit, Macro, Token};

/// How deep the last resort for macro bodies looks into nested groups.
const MAX_DEPTH: usize = 32;

/// How a call sends its SQL to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Send {
    /// A simple-protocol Query message (`simple_query`, `batch_execute`, sqlx's `raw_sql`).
    Simple,
    /// An extended-protocol Parse of the unnamed statement (`query_typed`, diesel's
    /// `sql_query`, sqlx's `.persistent(false)`).
    Unnamed,
    /// An extended-protocol Parse of a named statement, kept on the server connection:
    /// tokio-postgres prepares every `&str` it runs (`query`, `execute`, `prepare`...), and so
    /// do pinpool's statement cache and sqlx's persistent statements.
    Named,
}

/// A string literal read as the SQL of a query call.
#[derive(Debug, Clone)]
pub struct Site {
    /// The SQL, as the literal's value (escapes resolved, `concat!` joined).
    pub sql: String,
    /// 1-based line of the literal.
    pub line: usize,
    /// 1-based column of the literal, in characters.
    pub column: usize,
    /// The call as written: `.query`, `sqlx::query`, `sqlx::query_as!`.
    pub call: String,
    /// How the call sends the SQL.
    pub send: Send,
}

/// A query call whose SQL argument is not a literal.
#[derive(Debug, Clone)]
pub struct Unread {
    /// 1-based line of the SQL argument.
    pub line: usize,
    /// 1-based column of the SQL argument, in characters.
    pub column: usize,
    /// The call as written.
    pub call: String,
    /// What the argument is instead.
    pub what: Unreadable,
}

/// Why a query call's SQL argument was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// Built at run time, or named (a variable, a constant, `format!`, a function's result).
    RunTime,
    /// Read from a file: sqlx's `query_file!` family, `include_str!` (check that file
    /// itself).
    File,
}

/// What a Rust source holds: the SQL read, and the query calls not read.
#[derive(Debug, Default)]
pub struct Sources {
    /// The literals read, in source order.
    pub sites: Vec<Site>,
    /// The query calls whose SQL is not a literal, in source order.
    pub unread: Vec<Unread>,
}

/// Parses a Rust source file and finds the SQL of its query calls.
pub fn scan(source: &str) -> syn::Result<Sources> {
    let file = syn::parse_file(source)?;
    let mut consts = Consts::default();
    consts.visit_file(&file);
    let mut finder = Finder {
        consts: consts.found,
        included: consts.included,
        ..Finder::default()
    };
    finder.visit_file(&file);
    Ok(finder.found)
}

/// The method calls, by name: (name, number of arguments, how the SQL is sent, whether a
/// non-literal first argument counts as a query call not read). The SQL is the first argument.
const METHODS: &[(&str, usize, Send, bool)] = &[
    // tokio-postgres's Client and Transaction, and pinpool's PooledClient and Transaction.
    ("query", 2, Send::Named, true),
    ("query_one", 2, Send::Named, true),
    ("query_opt", 2, Send::Named, true),
    ("query_raw", 2, Send::Named, true),
    ("execute", 2, Send::Named, true),
    ("execute_raw", 2, Send::Named, true),
    ("prepare", 1, Send::Named, true),
    ("prepare_typed", 2, Send::Named, true),
    ("copy_in", 1, Send::Named, true),
    ("copy_out", 1, Send::Named, true),
    ("query_typed", 2, Send::Unnamed, true),
    ("query_typed_raw", 2, Send::Unnamed, true),
    ("simple_query", 1, Send::Simple, true),
    ("batch_execute", 1, Send::Simple, true),
    // pinpool's own.
    ("prepare_cached", 1, Send::Named, true),
    ("prepare_typed_cached", 2, Send::Named, true),
    ("query_scalar", 2, Send::Named, true),
    ("query_one_scalar", 2, Send::Named, true),
    ("query_opt_scalar", 2, Send::Named, true),
    ("query_typed_one", 2, Send::Unnamed, true),
    ("query_typed_opt", 2, Send::Unnamed, true),
    ("execute_typed", 2, Send::Unnamed, true),
    ("simple_query_raw", 1, Send::Simple, true),
    // sqlx's Executor methods given a `&str`: no arguments, so the simple protocol. With one
    // argument these are also the methods that run a built query (`sqlx::query(..)
    // .fetch_all(&pool)`, diesel's `.execute(&mut conn)`): only a literal counts.
    ("execute", 1, Send::Simple, false),
    ("execute_many", 1, Send::Simple, false),
    ("fetch", 1, Send::Simple, false),
    ("fetch_all", 1, Send::Simple, false),
    ("fetch_many", 1, Send::Simple, false),
    ("fetch_one", 1, Send::Simple, false),
    ("fetch_optional", 1, Send::Simple, false),
];

/// The function calls, by the last segment of their path: (name, number of arguments, how the
/// SQL is sent). The SQL is the first argument.
const FUNCTIONS: &[(&str, usize, Send)] = &[
    // sqlx: persistent (named) statements unless `.persistent(false)` follows.
    ("query", 1, Send::Named),
    ("query_as", 1, Send::Named),
    ("query_scalar", 1, Send::Named),
    ("query_with", 2, Send::Named),
    ("query_as_with", 2, Send::Named),
    ("query_scalar_with", 2, Send::Named),
    ("raw_sql", 1, Send::Simple),
    // diesel: raw SQL is never put in its statement cache.
    ("sql_query", 1, Send::Unnamed),
];

/// sqlx's query macros, by the last segment of their path: (name, position of the SQL among
/// the arguments). The `_as` forms take the output type first.
const MACROS: &[(&str, usize)] = &[
    ("query", 0),
    ("query_scalar", 0),
    ("query_unchecked", 0),
    ("query_scalar_unchecked", 0),
    ("query_as", 1),
    ("query_as_unchecked", 1),
];

/// sqlx's macros that read the SQL from a file.
const FILE_MACROS: &[&str] = &[
    "query_file",
    "query_file_as",
    "query_file_scalar",
    "query_file_unchecked",
    "query_file_as_unchecked",
    "query_file_scalar_unchecked",
];

/// A string literal's value and where it starts.
type Literal = Option<(String, Span)>;

#[derive(Default)]
struct Finder {
    found: Sources,
    /// The file's `const` and `static` items (and associated constants) bound to a string
    /// literal, by name; `None` where one name has several values.
    consts: HashMap<String, Literal>,
    /// The `let` bindings in scope, innermost last: a name bound to a string literal, or
    /// `None` where a later binding shadows it with something else.
    scopes: Vec<Scope>,
    /// The file's constants bound to `include_str!`.
    included: HashSet<String>,
}

#[derive(Default)]
struct Scope {
    /// A function's body: the bindings of the scopes around it are not in scope.
    barrier: bool,
    names: HashMap<String, Literal>,
    /// The names bound to a statement prepared here (`let s = client.prepare("...")`): its
    /// SQL was read at the `prepare`.
    statements: HashSet<String>,
}

/// Collects the file's constants bound to string literals.
#[derive(Default)]
struct Consts {
    found: HashMap<String, Literal>,
    included: HashSet<String>,
}

impl Consts {
    fn add(&mut self, name: String, expr: &Expr) {
        if matches!(expr, Expr::Macro(m) if is_macro(&m.mac, "include_str")) {
            self.included.insert(name.clone());
        }
        let value = Finder::default().sql_of(expr);
        let entry = self.found.entry(name).or_insert_with(|| value.clone());
        if entry.as_ref().map(|(sql, _)| sql) != value.as_ref().map(|(sql, _)| sql) {
            *entry = None;
        }
    }
}

impl<'ast> Visit<'ast> for Consts {
    fn visit_item_const(&mut self, node: &'ast syn::ItemConst) {
        self.add(node.ident.to_string(), &node.expr);
        visit::visit_item_const(self, node);
    }

    fn visit_item_static(&mut self, node: &'ast syn::ItemStatic) {
        if matches!(node.mutability, syn::StaticMutability::None) {
            self.add(node.ident.to_string(), &node.expr);
        }
        visit::visit_item_static(self, node);
    }

    fn visit_impl_item_const(&mut self, node: &'ast syn::ImplItemConst) {
        self.add(node.ident.to_string(), &node.expr);
        visit::visit_impl_item_const(self, node);
    }
}

/// The 1-based line and column where `span` starts.
fn position(span: Span) -> (usize, usize) {
    let start = span.start();
    (start.line, start.column + 1)
}

/// A path as written, without generic arguments: `sqlx::query`.
fn path_text(path: &syn::Path) -> String {
    let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
    let lead = if path.leading_colon.is_some() {
        "::"
    } else {
        ""
    };
    format!("{lead}{}", segments.join("::"))
}

fn last_ident(path: &syn::Path) -> Option<String> {
    path.segments.last().map(|s| s.ident.to_string())
}

/// The comma-separated expressions of a macro body, if it is one.
fn macro_exprs(tokens: TokenStream) -> Option<Punctuated<Expr, Token![,]>> {
    Punctuated::<Expr, Token![,]>::parse_terminated
        .parse2(tokens)
        .ok()
}

/// The first argument of a `query_as!`-shaped macro is a type; the rest are expressions.
fn typed_macro_exprs(tokens: TokenStream) -> Option<Punctuated<Expr, Token![,]>> {
    let parser = |input: ParseStream| {
        let _: syn::Type = input.parse()?;
        let _: Token![,] = input.parse()?;
        Punctuated::<Expr, Token![,]>::parse_terminated(input)
    };
    parser.parse2(tokens).ok()
}

/// The value of a literal as `concat!` writes it.
fn concat_piece(lit: &Lit) -> Option<String> {
    match lit {
        Lit::Str(s) => Some(s.value()),
        Lit::Char(c) => Some(c.value().to_string()),
        Lit::Int(i) => Some(i.base10_digits().to_string()),
        Lit::Float(f) => Some(f.base10_digits().to_string()),
        Lit::Bool(b) => Some(b.value.to_string()),
        _ => None,
    }
}

fn is_macro(mac: &Macro, name: &str) -> bool {
    last_ident(&mac.path).as_deref() == Some(name)
}

/// True when `expr` is a `prepare*` call, awaited, unwrapped or `?`-ed.
fn is_prepare(expr: &Expr) -> bool {
    match expr {
        Expr::Await(a) => is_prepare(&a.base),
        Expr::Try(t) => is_prepare(&t.expr),
        Expr::MethodCall(m) if ["unwrap", "expect"].contains(&m.method.to_string().as_str()) => {
            is_prepare(&m.receiver)
        }
        Expr::MethodCall(m) => METHODS.iter().any(|(name, arity, _, _)| {
            name.starts_with("prepare") && m.method == name && *arity == m.args.len()
        }),
        _ => false,
    }
}

/// Where an expression starts, where its first token is easy to reach (the position of a
/// call not read; the call's own is used otherwise).
fn expr_start(expr: &Expr) -> Option<Span> {
    match expr {
        Expr::Path(p) => p.path.segments.first().map(|s| s.ident.span()),
        Expr::Macro(m) => m.mac.path.segments.first().map(|s| s.ident.span()),
        Expr::Reference(r) => Some(r.and_token.span),
        Expr::Paren(p) => Some(p.paren_token.span.open()),
        Expr::Block(b) => Some(b.block.brace_token.span.open()),
        Expr::If(i) => Some(i.if_token.span),
        Expr::Match(m) => Some(m.match_token.span),
        Expr::Unsafe(u) => Some(u.unsafe_token.span),
        Expr::Unary(u) => match &u.op {
            syn::UnOp::Deref(t) => Some(t.span),
            syn::UnOp::Not(t) => Some(t.span),
            syn::UnOp::Neg(t) => Some(t.span),
            _ => None,
        },
        Expr::MethodCall(m) => expr_start(&m.receiver),
        Expr::Call(c) => expr_start(&c.func),
        Expr::Field(f) => expr_start(&f.base),
        Expr::Index(i) => expr_start(&i.expr),
        Expr::Cast(c) => expr_start(&c.expr),
        Expr::Try(t) => expr_start(&t.expr),
        Expr::Await(a) => expr_start(&a.base),
        Expr::Group(g) => expr_start(&g.expr),
        Expr::Lit(l) => Some(l.lit.span()),
        _ => None,
    }
}

/// A query call as written, and where it starts.
struct Call(String, Span);

/// Where a macro call starts.
fn macro_span(mac: &Macro) -> Span {
    mac.path
        .segments
        .first()
        .map_or_else(|| mac.bang_token.span, |s| s.ident.span())
}

impl Finder {
    /// The SQL text of an argument and where its literal starts, when it is a string literal,
    /// a `concat!` of literals, a name bound to one (a `let` in scope, a constant of the
    /// file), or one of those behind `&`, parentheses or `.to_string()`.
    fn sql_of(&self, expr: &Expr) -> Literal {
        match expr {
            Expr::Lit(l) => match &l.lit {
                Lit::Str(s) => Some((s.value(), s.span())),
                _ => None,
            },
            Expr::Reference(r) => self.sql_of(&r.expr),
            Expr::Paren(p) => self.sql_of(&p.expr),
            Expr::Group(g) => self.sql_of(&g.expr),
            Expr::MethodCall(m)
                if m.args.is_empty()
                    && ["to_string", "to_owned", "into", "as_str"]
                        .contains(&m.method.to_string().as_str()) =>
            {
                self.sql_of(&m.receiver)
            }
            Expr::Macro(m) if is_macro(&m.mac, "concat") => {
                let parts = macro_exprs(m.mac.tokens.clone())?;
                let mut sql = String::new();
                for part in &parts {
                    match part {
                        Expr::Lit(l) => sql.push_str(&concat_piece(&l.lit)?),
                        Expr::Macro(_) => sql.push_str(&self.sql_of(part)?.0),
                        _ => return None,
                    }
                }
                let span = m.mac.path.segments.first()?.ident.span();
                Some((sql, span))
            }
            Expr::Path(p) if p.qself.is_none() => self.resolve(&p.path),
            _ => None,
        }
    }

    /// A name's literal: a local `name`, else a constant `NAME`, `Self::NAME` or
    /// `Type::NAME` of this file.
    fn resolve(&self, path: &syn::Path) -> Literal {
        let name = last_ident(path)?;
        if path.segments.len() == 1 && path.leading_colon.is_none() {
            for scope in self.scopes.iter().rev() {
                if let Some(bound) = scope.names.get(&name) {
                    return bound.clone();
                }
                if scope.barrier {
                    break;
                }
            }
        } else if path.segments.len() > 2 || path.leading_colon.is_some() {
            return None;
        }
        self.consts.get(&name).cloned().flatten()
    }

    /// True when an argument names a statement prepared in scope.
    fn prepared(&self, expr: &Expr) -> bool {
        match expr {
            Expr::Reference(r) => self.prepared(&r.expr),
            Expr::Paren(p) => self.prepared(&p.expr),
            Expr::Path(p) if p.path.segments.len() == 1 && p.qself.is_none() => {
                let name = p.path.segments[0].ident.to_string();
                for scope in self.scopes.iter().rev() {
                    if scope.statements.contains(&name) {
                        return true;
                    }
                    if scope.names.contains_key(&name) || scope.barrier {
                        return false;
                    }
                }
                false
            }
            _ => false,
        }
    }

    /// True when an argument is `include_str!(...)` or a constant bound to it.
    fn included(&self, expr: &Expr) -> bool {
        match expr {
            Expr::Reference(r) => self.included(&r.expr),
            Expr::Paren(p) => self.included(&p.expr),
            Expr::Macro(m) => is_macro(&m.mac, "include_str"),
            Expr::Path(p) => {
                p.path.segments.len() <= 2
                    && last_ident(&p.path).is_some_and(|name| self.included.contains(&name))
            }
            _ => false,
        }
    }

    /// Binds `pat` in the innermost scope: to `value` when it is a plain name.
    fn bind(&mut self, pat: &syn::Pat, value: Literal) {
        let Some(scope) = self.scopes.last_mut() else {
            return;
        };
        match pat {
            syn::Pat::Ident(i) => {
                let value = if i.mutability.is_none() && i.by_ref.is_none() && i.subpat.is_none() {
                    value
                } else {
                    None
                };
                scope.statements.remove(&i.ident.to_string());
                scope.names.insert(i.ident.to_string(), value);
            }
            syn::Pat::Type(t) => self.bind(&t.pat, value),
            _ => {}
        }
    }

    /// Runs `f` in a new scope.
    fn scoped(&mut self, barrier: bool, f: impl FnOnce(&mut Finder)) {
        self.scopes.push(Scope {
            barrier,
            ..Scope::default()
        });
        f(self);
        self.scopes.pop();
    }

    /// Records the SQL argument of a matched query call: read, or counted as not read.
    fn argument(&mut self, call: Call, arg: &Expr, send: Send, count_unread: bool) {
        let Call(call, call_span) = call;
        if let Some((sql, span)) = self.sql_of(arg) {
            let (line, column) = position(span);
            // A constant's literal is reported once for each way calls send it.
            let seen = self
                .found
                .sites
                .iter()
                .any(|s| (s.line, s.column, s.send) == (line, column, send));
            if seen {
                return;
            }
            self.found.sites.push(Site {
                sql,
                line,
                column,
                call,
                send,
            });
        } else if count_unread && !self.prepared(arg) {
            let what = if self.included(arg) {
                Unreadable::File
            } else {
                Unreadable::RunTime
            };
            self.unread(call, expr_start(arg).unwrap_or(call_span), what);
        }
    }

    fn unread(&mut self, call: String, span: Span, what: Unreadable) {
        let (line, column) = position(span);
        self.found.unread.push(Unread {
            line,
            column,
            call,
            what,
        });
    }

    /// A macro: sqlx's query macros by their shape; any other body read as expressions or
    /// statements where it parses as such, and left alone where it does not.
    fn mac(&mut self, mac: &Macro) {
        let name = last_ident(&mac.path).unwrap_or_default();
        let call = format!("{}!", path_text(&mac.path));
        if FILE_MACROS.contains(&name.as_str()) {
            self.unread(call, macro_span(mac), Unreadable::File);
            return;
        }
        if let Some(&(_, position)) = MACROS.iter().find(|(n, _)| *n == name) {
            let args = if position == 0 {
                macro_exprs(mac.tokens.clone())
            } else {
                typed_macro_exprs(mac.tokens.clone())
            };
            if let Some(args) = args {
                if let Some(sql) = args.first() {
                    self.argument(Call(call, macro_span(mac)), sql, Send::Named, true);
                }
                for arg in &args {
                    self.visit_expr(arg);
                }
                return;
            }
        }
        if name == "macro_rules" {
            return;
        }
        if let Some(args) = macro_exprs(mac.tokens.clone()) {
            for arg in &args {
                self.visit_expr(arg);
            }
        } else if let Ok(stmts) = Block::parse_within.parse2(mac.tokens.clone()) {
            self.scoped(false, |f| {
                for stmt in &stmts {
                    f.visit_stmt(stmt);
                }
            });
        } else {
            self.pieces(mac.tokens.clone(), 0);
        }
    }

    /// The last resort for a macro body that is neither expressions nor statements
    /// (`tokio::select! { rows = client.query("...", &[]) => ... }`): its pieces between `,`,
    /// `;`, `=>` and a lone `=` are read as expressions where they parse, and the groups of
    /// the pieces that do not are looked into the same way.
    fn pieces(&mut self, tokens: TokenStream, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let mut piece: Vec<TokenTree> = Vec::new();
        for (i, tree) in trees.iter().enumerate() {
            let ends = match tree {
                TokenTree::Punct(p) => match p.as_char() {
                    ',' | ';' => true,
                    // `=>`: the `=` joined to a `>`, which then ends nothing itself.
                    '=' if p.spacing() == Spacing::Joint => {
                        matches!(trees.get(i + 1), Some(TokenTree::Punct(q)) if q.as_char() == '>')
                    }
                    // A lone `=`, not the end of `==`, `<=`, `+=`...
                    '=' => !matches!(
                        i.checked_sub(1).map(|j| &trees[j]),
                        Some(TokenTree::Punct(q)) if q.spacing() == Spacing::Joint
                    ),
                    '>' => {
                        matches!(
                            i.checked_sub(1).map(|j| &trees[j]),
                            Some(TokenTree::Punct(q)) if q.as_char() == '=' && q.spacing() == Spacing::Joint
                        ) && piece.is_empty()
                    }
                    _ => false,
                },
                _ => false,
            };
            if ends {
                self.piece(std::mem::take(&mut piece), depth);
            } else {
                piece.push(tree.clone());
            }
        }
        self.piece(piece, depth);
    }

    fn piece(&mut self, piece: Vec<TokenTree>, depth: usize) {
        if piece.is_empty() {
            return;
        }
        let tokens: TokenStream = piece.iter().cloned().collect();
        if let Ok(expr) = syn::parse2::<Expr>(tokens) {
            self.visit_expr(&expr);
        } else {
            for tree in piece {
                if let TokenTree::Group(g) = tree {
                    self.pieces(g.stream(), depth + 1);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Finder {
    fn visit_expr_method_call(&mut self, node: &'ast ExprMethodCall) {
        let name = node.method.to_string();
        let arity = node.args.len();
        if let Some(&(_, _, send, count)) = METHODS
            .iter()
            .find(|(n, a, _, _)| *n == name && *a == arity)
        {
            let call = Call(format!(".{name}"), node.method.span());
            self.argument(call, &node.args[0], send, count);
        }
        // sqlx's `query("...").persistent(false)`: the unnamed statement.
        let unnamed = name == "persistent"
            && matches!(node.args.first(), Some(Expr::Lit(l)) if matches!(&l.lit, Lit::Bool(b) if !b.value));
        let before = self.found.sites.len();
        visit::visit_expr_method_call(self, node);
        if unnamed
            && let Some(site) = self.found.sites.get_mut(before)
            && site.send == Send::Named
            && !site.call.starts_with('.')
        {
            site.send = Send::Unnamed;
        }
    }

    fn visit_expr_call(&mut self, node: &'ast ExprCall) {
        if let Expr::Path(p) = &*node.func
            && let Some(name) = last_ident(&p.path)
            && let Some(&(_, _, send)) = FUNCTIONS
                .iter()
                .find(|(n, a, _)| *n == name && *a == node.args.len())
        {
            let span = p
                .path
                .segments
                .first()
                .map_or_else(|| node.paren_token.span.open(), |s| s.ident.span());
            self.argument(Call(path_text(&p.path), span), &node.args[0], send, true);
        }
        visit::visit_expr_call(self, node);
    }

    fn visit_macro(&mut self, node: &'ast Macro) {
        self.mac(node);
    }

    fn visit_block(&mut self, node: &'ast Block) {
        self.scoped(false, |f| visit::visit_block(f, node));
    }

    fn visit_local(&mut self, node: &'ast syn::Local) {
        visit::visit_local(self, node);
        let value = match &node.init {
            Some(init) if init.diverge.is_none() => self.sql_of(&init.expr),
            _ => None,
        };
        self.bind(&node.pat, value);
        if let (Some(init), syn::Pat::Ident(i)) = (&node.init, &node.pat)
            && is_prepare(&init.expr)
            && let Some(scope) = self.scopes.last_mut()
        {
            scope.statements.insert(i.ident.to_string());
        }
    }

    fn visit_item_fn(&mut self, node: &'ast syn::ItemFn) {
        self.scoped(true, |f| visit::visit_item_fn(f, node));
    }

    fn visit_impl_item_fn(&mut self, node: &'ast syn::ImplItemFn) {
        self.scoped(true, |f| visit::visit_impl_item_fn(f, node));
    }

    fn visit_trait_item_fn(&mut self, node: &'ast syn::TraitItemFn) {
        self.scoped(true, |f| visit::visit_trait_item_fn(f, node));
    }

    fn visit_expr_closure(&mut self, node: &'ast syn::ExprClosure) {
        self.scoped(false, |f| {
            for input in &node.inputs {
                f.bind(input, None);
            }
            visit::visit_expr_closure(f, node);
        });
    }
}
