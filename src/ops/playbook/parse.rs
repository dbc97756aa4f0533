//! Playbook YAML → [`Playbook`], with every error at its `file:line:column`.
//!
//! The parser checks everything that can be checked without a host, so that a typo fails the run before
//! any host is touched: play and task keywords and their types, that a task calls exactly one known
//! module, argument names against the module's [`ModuleSpec::args`], template and `when` syntax,
//! handler names and `notify` targets. When a task's arguments hold no template, they are also built
//! (`ModuleSpec::build`), so that a wrong value (`state: presnt`) is reported here rather than on the
//! first host that reaches the task. Arguments with templates are built per host by the runner.
//!
//! Unknown names are reported with the valid choices, and with a "did you mean" for a likely typo.

use std::collections::HashMap;
use std::path::PathBuf;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::Node;
use serde_json::Value;

use super::model::{Location, Loop, ParseError, Play, Playbook, Task};
use super::yaml::{self, describe, did_you_mean, is_null, list, Source, Top};
use crate::ops::modules::{ModuleSpec, MODULES};

/// The keywords of a play.
pub const PLAY_KEYWORDS: &[&str] = &["name", "hosts", "become", "vars", "tasks", "handlers"];

/// The keywords of a task (or handler), besides its one module.
pub const TASK_KEYWORDS: &[&str] = &[
    "name",
    "notify",
    "when",
    "tags",
    "become",
    "loop",
    "register",
    "ignore_errors",
];

/// Parses the playbook `text`; `name` is used in locations (a path, or `builtin:NAME`), `dir` is kept
/// for template lookup.
pub fn parse(name: &str, dir: Option<PathBuf>, text: &str) -> Result<Playbook, ParseError> {
    parse_with_modules(name, dir, text, MODULES)
}

/// [`parse`] against a given set of modules (the tests use modules of their own).
pub fn parse_with_modules(
    name: &str,
    dir: Option<PathBuf>,
    text: &str,
    modules: &[&'static ModuleSpec],
) -> Result<Playbook, ParseError> {
    let parser = Parser {
        src: Source::new(name),
        modules,
    };
    let root = parser.src.load(text, Top::Sequence)?;
    let Node::Sequence(items) = &root else {
        return Err(parser.src.error(
            parser.src.node(&root),
            "a playbook must be a list of plays (`- name: …`)",
        ));
    };
    if items.is_empty() {
        return Err(parser
            .src
            .error(parser.src.span(root.span()), "the playbook has no plays"));
    }
    let plays = items
        .iter()
        .map(|node| parser.play(node))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Playbook {
        name: name.to_string(),
        dir,
        plays,
    })
}

struct Parser<'m> {
    src: Source,
    modules: &'m [&'static ModuleSpec],
}

/// A task as parsed, with the locations of its `notify` entries for the check against the handlers.
struct ParsedTask {
    task: Task,
    notify_at: Vec<Location>,
    name_at: Location,
}

impl Parser<'_> {
    fn module_names(&self) -> Vec<&'static str> {
        self.modules.iter().map(|m| m.name).collect()
    }

    fn lookup(&self, name: &str) -> Option<&'static ModuleSpec> {
        self.modules.iter().copied().find(|m| m.name == name)
    }

    fn play(&self, node: &Node) -> Result<Play, ParseError> {
        let src = &self.src;
        let Node::Mapping(map) = node else {
            return Err(src.error(
                src.node(node),
                format!(
                    "a play must be a mapping (`name:`, `hosts:`, `tasks:` …), not {}",
                    describe(node)
                ),
            ));
        };
        let location = src.mapping(map);
        let mut name = None;
        let mut hosts = "all".to_string();
        let mut become_root = true;
        let mut vars = serde_json::Map::new();
        let mut tasks = Vec::new();
        let mut handlers = Vec::new();
        for (key, value) in map.iter() {
            match key.as_str() {
                "name" => name = Some(self.non_empty_string(key, value)?),
                "hosts" => hosts = self.hosts(key, value)?,
                "become" => become_root = yaml::boolean(src, key, value)?,
                "vars" => vars = yaml::vars(src, key, value)?,
                "tasks" => tasks = self.tasks(key, value)?,
                "handlers" => handlers = self.tasks(key, value)?,
                other => {
                    let hint = if self.lookup(other).is_some() || TASK_KEYWORDS.contains(&other) {
                        " (tasks go in the play's `tasks:` list)"
                    } else {
                        ""
                    };
                    return Err(src.error(
                        src.key(key),
                        format!(
                            "unknown play keyword `{other}`{}{hint}; keywords: {}",
                            did_you_mean(other, PLAY_KEYWORDS),
                            list(PLAY_KEYWORDS)
                        ),
                    ));
                }
            }
        }
        let Some(name) = name else {
            return Err(src.error(location, "this play has no `name`"));
        };
        self.check_handlers(&name, &tasks, &handlers)?;
        Ok(Play {
            name,
            hosts,
            vars,
            become_root,
            tasks: tasks.into_iter().map(|t| t.task).collect(),
            handlers: handlers.into_iter().map(|t| t.task).collect(),
            location,
        })
    }

    /// Handler names are unique within a play, and every `notify` names one of them.
    fn check_handlers(
        &self,
        play: &str,
        tasks: &[ParsedTask],
        handlers: &[ParsedTask],
    ) -> Result<(), ParseError> {
        let mut seen: HashMap<&str, &Location> = HashMap::new();
        for h in handlers {
            if let Some(first) = seen.insert(&h.task.name, &h.name_at) {
                return Err(self.src.error(
                    h.name_at.clone(),
                    format!(
                        "handler `{}` is defined twice in play `{play}` (first at line {}, column {})",
                        h.task.name, first.line, first.column
                    ),
                ));
            }
        }
        let names: Vec<&str> = handlers.iter().map(|h| h.task.name.as_str()).collect();
        for t in tasks.iter().chain(handlers) {
            for (target, at) in t.task.notify.iter().zip(&t.notify_at) {
                if names.contains(&target.as_str()) {
                    continue;
                }
                let message = if names.is_empty() {
                    format!("`notify: {target}`: play `{play}` has no handlers")
                } else {
                    format!(
                        "`notify: {target}`: no such handler in play `{play}`{}; handlers: {}",
                        did_you_mean(target, &names),
                        list(&names)
                    )
                };
                return Err(self.src.error(at.clone(), message));
            }
        }
        Ok(())
    }

    fn hosts(&self, key: &MarkedScalarNode, value: &Node) -> Result<String, ParseError> {
        let patterns = yaml::string_or_list(&self.src, key, value)?;
        if let Some((_, at)) = patterns.iter().find(|(p, _)| p.trim().is_empty()) {
            return Err(self.src.error(at.clone(), "`hosts` must not be empty"));
        }
        Ok(patterns
            .into_iter()
            .map(|(p, _)| p)
            .collect::<Vec<_>>()
            .join(","))
    }

    fn non_empty_string(&self, key: &MarkedScalarNode, value: &Node) -> Result<String, ParseError> {
        let s = yaml::string(&self.src, key, value)?;
        if s.trim().is_empty() {
            return Err(self.src.error(
                self.src.value(key, value),
                format!("`{}` must not be empty", key.as_str()),
            ));
        }
        Ok(s)
    }

    fn tasks(&self, key: &MarkedScalarNode, value: &Node) -> Result<Vec<ParsedTask>, ParseError> {
        match value {
            Node::Sequence(items) => items.iter().map(|item| self.task(item)).collect(),
            Node::Scalar(s) if is_null(s) => Ok(Vec::new()),
            other => Err(self.src.error(
                self.src.value(key, value),
                format!(
                    "`{}` must be a list of tasks (`- name: …`), not {}",
                    key.as_str(),
                    describe(other)
                ),
            )),
        }
    }

    fn task(&self, node: &Node) -> Result<ParsedTask, ParseError> {
        let src = &self.src;
        let Node::Mapping(map) = node else {
            return Err(src.error(
                src.node(node),
                format!(
                    "a task must be a mapping (`name:` and a module), not {}",
                    describe(node)
                ),
            ));
        };
        let location = src.mapping(map);
        let mut name = None;
        let mut module: Option<(&'static ModuleSpec, &MarkedScalarNode, &Node)> = None;
        let mut notify = Vec::new();
        let mut when = Vec::new();
        let mut tags = Vec::new();
        let mut become_root = None;
        let mut loop_items = None;
        let mut register = None;
        let mut ignore_errors = false;
        let mut unknown = None;
        for (key, value) in map.iter() {
            match key.as_str() {
                "name" => name = Some((self.non_empty_string(key, value)?, src.value(key, value))),
                "notify" => notify = yaml::string_or_list(src, key, value)?,
                "when" => when = self.when(key, value)?,
                "tags" => {
                    tags = yaml::string_or_list(src, key, value)?
                        .into_iter()
                        .map(|(t, _)| t)
                        .collect()
                }
                "become" => become_root = Some(yaml::boolean(src, key, value)?),
                "loop" => loop_items = Some(self.loop_items(key, value)?),
                "register" => register = Some(self.register(key, value)?),
                "ignore_errors" => ignore_errors = yaml::boolean(src, key, value)?,
                other => {
                    let Some(spec) = self.lookup(other) else {
                        // Reported after the loop: the task's module may make a better message.
                        unknown.get_or_insert(key);
                        continue;
                    };
                    if let Some((first, first_key, _)) = module {
                        let at = src.key(first_key);
                        return Err(src.error(
                            src.key(key),
                            format!(
                                "a task calls exactly one module, but this one has `{}` (line {}, column {}) \
                                 and `{other}`; split it into two tasks",
                                first.name, at.line, at.column
                            ),
                        ));
                    }
                    module = Some((spec, key, value));
                }
            }
        }
        if let Some(key) = unknown {
            return Err(self.unknown_task_key(key, module.map(|(spec, _, _)| spec)));
        }
        let Some((name, name_at)) = name else {
            return Err(src.error(location, "this task has no `name`"));
        };
        let Some((spec, module_key, module_value)) = module else {
            return Err(src.error(
                location,
                format!(
                    "task `{name}` calls no module; modules: {}",
                    list(&self.module_names())
                ),
            ));
        };
        let args = self.module_args(spec, module_key, module_value)?;
        let (notify, notify_at) = notify.into_iter().unzip();
        Ok(ParsedTask {
            task: Task {
                name,
                module: spec,
                args,
                notify,
                when,
                tags,
                become_root,
                loop_items,
                register,
                ignore_errors,
                location,
            },
            notify_at,
            name_at,
        })
    }

    fn unknown_task_key(&self, key: &MarkedScalarNode, module: Option<&ModuleSpec>) -> ParseError {
        let other = key.as_str();
        let message = match module {
            // Ansible habit: a module argument written as a task keyword.
            Some(spec) if spec.args.contains(&other) => format!(
                "`{other}` is an argument of `{m}`, not a task keyword: write it inside the module's \
                 arguments, e.g. `{m}: {{{first}: …, {other}: …}}`",
                m = spec.name,
                first = spec.free_form.unwrap_or(spec.args[0]),
            ),
            _ => {
                let names = self.module_names();
                let all: Vec<&str> = names.iter().chain(TASK_KEYWORDS).copied().collect();
                format!(
                    "unknown module or keyword `{other}`{}; modules: {}; keywords: {}",
                    did_you_mean(other, &all),
                    list(&names),
                    list(TASK_KEYWORDS)
                )
            }
        };
        self.src.error(self.src.key(key), message)
    }

    fn when(&self, key: &MarkedScalarNode, value: &Node) -> Result<Vec<String>, ParseError> {
        yaml::string_or_list(&self.src, key, value)?
            .into_iter()
            .map(|(expr, at)| {
                if expr.contains("{{") || expr.contains("{%") {
                    return Err(self.src.error(
                        at,
                        format!(
                            "`when` is an expression already: write it without `{{{{ }}}}` \
                             (e.g. `when: nginx_port != 0`), not `{expr}`"
                        ),
                    ));
                }
                let env = minijinja::Environment::new();
                if let Err(e) = env.compile_expression(&expr) {
                    return Err(self.src.error(
                        at,
                        format!(
                            "`when: {expr}` is not a valid expression: {}",
                            jinja_error(&e)
                        ),
                    ));
                }
                Ok(expr)
            })
            .collect()
    }

    fn loop_items(&self, key: &MarkedScalarNode, value: &Node) -> Result<Loop, ParseError> {
        match value {
            Node::Sequence(items) => {
                self.check_templates(value)?;
                Ok(Loop::Items(items.iter().map(yaml::to_json).collect()))
            }
            Node::Scalar(s) if !is_null(s) && is_template(s.as_str()) => {
                self.check_templates(value)?;
                Ok(Loop::Expr(s.as_str().to_string()))
            }
            other => Err(self.src.error(
                self.src.value(key, value),
                format!(
                    "`loop` must be a list, or a template that renders to one (e.g. \"{{{{ packages }}}}\"), \
                     not {}",
                    describe(other)
                ),
            )),
        }
    }

    fn register(&self, key: &MarkedScalarNode, value: &Node) -> Result<String, ParseError> {
        let name = yaml::string(&self.src, key, value)?;
        if !yaml::is_identifier(&name) {
            return Err(self.src.error(
                self.src.value(key, value),
                format!(
                    "`register: {name}`: a variable name is letters, digits and `_`, not starting with a digit"
                ),
            ));
        }
        Ok(name)
    }

    /// The module's arguments as JSON, each name checked; built now when no template is involved.
    fn module_args(
        &self,
        spec: &'static ModuleSpec,
        key: &MarkedScalarNode,
        value: &Node,
    ) -> Result<Value, ParseError> {
        let src = &self.src;
        let args = match value {
            Node::Mapping(map) => {
                self.check_arg_names(spec, map)?;
                yaml::to_json(value)
            }
            Node::Scalar(s) if is_null(s) => Value::Object(serde_json::Map::new()),
            Node::Scalar(s) if spec.free_form.is_some() => {
                let arg = spec.free_form.unwrap_or_default();
                serde_json::json!({ arg: s.as_str() })
            }
            other => {
                return Err(src.error(
                    src.value(key, value),
                    format!(
                        "module `{}` takes a mapping of arguments (`name: value`), not {}; arguments: {}",
                        spec.name,
                        describe(other),
                        list(spec.args)
                    ),
                ))
            }
        };
        self.check_templates(value)?;
        if !has_template(&args) {
            if let Err(message) = (spec.build)(args.clone()) {
                let at = blamed_argument(&message)
                    .and_then(|arg| value.as_mapping()?.get_node(arg))
                    .map_or_else(|| src.key(key), |node| src.node(node));
                return Err(src.error(at, format!("module `{}`: {message}", spec.name)));
            }
        }
        Ok(args)
    }

    fn check_arg_names(
        &self,
        spec: &ModuleSpec,
        map: &MarkedMappingNode,
    ) -> Result<(), ParseError> {
        for arg in map.keys() {
            if !spec.args.contains(&arg.as_str()) {
                return Err(self.src.error(
                    self.src.key(arg),
                    format!(
                        "module `{}` has no argument `{}`{}; arguments: {}",
                        spec.name,
                        arg.as_str(),
                        did_you_mean(arg.as_str(), spec.args),
                        list(spec.args)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Every string holding a template must compile (syntax only: variables are known per host).
    fn check_templates(&self, node: &Node) -> Result<(), ParseError> {
        match node {
            Node::Scalar(s) => {
                if is_template(s.as_str()) {
                    let env = minijinja::Environment::new();
                    if let Err(e) = env.template_from_str(s.as_str()) {
                        return Err(self.src.error(
                            self.src.node(node),
                            format!("template syntax error: {}", jinja_error(&e)),
                        ));
                    }
                }
                Ok(())
            }
            Node::Sequence(items) => items.iter().try_for_each(|n| self.check_templates(n)),
            Node::Mapping(map) => map.values().try_for_each(|n| self.check_templates(n)),
        }
    }
}

fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// Whether any string in `value` is a template (then the module is built per host, once rendered).
fn has_template(value: &Value) -> bool {
    match value {
        Value::String(s) => is_template(s),
        Value::Array(items) => items.iter().any(has_template),
        Value::Object(map) => map.values().any(has_template),
        _ => false,
    }
}

/// The argument named by a build error (`argument `state`: …` from `parse_args`, or a message that
/// starts with an argument name in backquotes), to point at it.
fn blamed_argument(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("argument `")
        .or_else(|| message.strip_prefix('`'))?;
    let path = &rest[..rest.find('`')?];
    // `settings.net.ipv4` or `name[0]`: the top-level argument.
    path.split(['.', '[']).next()
}

fn jinja_error(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::modules::{Ctx, Module, ModuleError, Outcome};
    use futures::future::BoxFuture;
    use serde_json::json;

    // Modules of our own, so these tests do not depend on how the real ones evolve.
    struct Nothing;
    impl Module for Nothing {
        fn run<'a>(&'a self, _ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
            Box::pin(async { Ok(Outcome::unchanged()) })
        }
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct PkgArgs {
        #[serde(deserialize_with = "crate::ops::modules::de_string_or_list")]
        name: Vec<String>,
        #[serde(default)]
        state: Option<PkgState>,
        #[serde(default)]
        update_cache: Option<bool>,
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum PkgState {
        Present,
        Absent,
    }

    fn build_pkg(args: Value) -> Result<Box<dyn Module>, String> {
        crate::ops::modules::parse_args::<PkgArgs>(args)?;
        Ok(Box::new(Nothing))
    }

    fn build_any(_args: Value) -> Result<Box<dyn Module>, String> {
        Ok(Box::new(Nothing))
    }

    static PKG: ModuleSpec = ModuleSpec {
        name: "pkg",
        args: &["name", "state", "update_cache"],
        free_form: None,
        build: build_pkg,
    };
    static SERVICE: ModuleSpec = ModuleSpec {
        name: "service",
        args: &["name", "state", "enabled"],
        free_form: None,
        build: build_any,
    };
    static COMMAND: ModuleSpec = ModuleSpec {
        name: "command",
        args: &["cmd", "creates"],
        free_form: Some("cmd"),
        build: build_any,
    };
    static TEST_MODULES: &[&ModuleSpec] = &[&PKG, &SERVICE, &COMMAND];

    fn parse_ok(text: &str) -> Playbook {
        parse_with_modules("site.yml", None, text, TEST_MODULES).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The error, checked to be at `line:col` of site.yml.
    fn parse_err(text: &str, line: usize, column: usize) -> String {
        let e = parse_with_modules("site.yml", None, text, TEST_MODULES)
            .expect_err("the playbook should be refused");
        assert_eq!(
            (e.location.line, e.location.column),
            (line, column),
            "wrong location for: {e}"
        );
        assert_eq!(&*e.location.file, "site.yml");
        assert!(e
            .to_string()
            .starts_with(&format!("site.yml:{line}:{column}: ")));
        e.message
    }

    const VALID: &str = r#"
- name: web servers
  hosts: web
  vars:
    packages: [nginx, curl]
    port: 80
    label: "80"
  tasks:
    - name: packages are installed
      pkg:
        name: "{{ item }}"
        state: present
      loop: "{{ packages }}"
      register: installed
      tags: [pkg]
    - name: one by one
      pkg: {name: "{{ item }}"}
      loop: [vim, "htop"]
    - name: site is enabled
      command: ln -s /etc/a /etc/b
      when:
        - port != 0
        - installed.changed
      notify: [reload nginx]
      become: false
      ignore_errors: true
      tags: always
  handlers:
    - name: reload nginx
      service: {name: nginx, state: reloaded}
- name: second play
  become: false
  tasks:
    - name: nothing
      command:
        cmd: "true"
"#;

    #[test]
    fn a_complete_playbook_is_read_with_all_its_keywords() {
        let pb = parse_ok(VALID);
        assert_eq!(pb.name, "site.yml");
        assert_eq!(pb.plays.len(), 2);
        let play = &pb.plays[0];
        assert_eq!(play.name, "web servers");
        assert_eq!(play.hosts, "web");
        assert!(play.become_root);
        assert_eq!(
            Value::Object(play.vars.clone()),
            json!({"packages": ["nginx", "curl"], "port": 80, "label": "80"})
        );
        assert_eq!((play.location.line, play.location.column), (2, 3));

        let t = &play.tasks[0];
        assert_eq!(t.module.name, "pkg");
        assert_eq!(t.args, json!({"name": "{{ item }}", "state": "present"}));
        assert_eq!(t.loop_items, Some(Loop::Expr("{{ packages }}".into())));
        assert_eq!(t.register.as_deref(), Some("installed"));
        assert_eq!(t.tags, ["pkg"]);
        assert_eq!(t.become_root, None);
        assert!(!t.ignore_errors);
        assert_eq!((t.location.line, t.location.column), (9, 7));

        let t = &play.tasks[1];
        assert_eq!(
            t.loop_items,
            Some(Loop::Items(vec![json!("vim"), json!("htop")]))
        );

        let t = &play.tasks[2];
        assert_eq!(t.module.name, "command");
        assert_eq!(t.args, json!({"cmd": "ln -s /etc/a /etc/b"}));
        assert_eq!(t.when, ["port != 0", "installed.changed"]);
        assert_eq!(t.notify, ["reload nginx"]);
        assert_eq!(t.become_root, Some(false));
        assert!(t.ignore_errors);
        assert_eq!(t.tags, ["always"]);

        assert_eq!(play.handlers.len(), 1);
        assert_eq!(
            play.handlers[0].args,
            json!({"name": "nginx", "state": "reloaded"})
        );

        let second = &pb.plays[1];
        assert_eq!(second.hosts, "all");
        assert!(!second.become_root);
        assert_eq!(second.tasks[0].args, json!({"cmd": "true"}));
    }

    #[test]
    fn broken_indentation_is_reported_at_its_line() {
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n   - name: b\n",
            5,
            4,
        );
        assert!(msg.starts_with("invalid YAML: "), "{msg}");
        let msg = parse_err("- name: p\n   hosts: web\n", 2, 9);
        assert!(msg.contains("indentation"), "{msg}");
    }

    #[test]
    fn an_unquoted_template_value_is_explained() {
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: {{ x }}}\n",
            4,
            20,
        );
        assert!(msg.contains("must be quoted"), "{msg}");
    }

    #[test]
    fn an_unknown_module_lists_modules_and_keywords_and_suggests_a_fix() {
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pgk: {name: x}\n",
            4,
            7,
        );
        assert!(
            msg.starts_with("unknown module or keyword `pgk` (did you mean `pkg`?)"),
            "{msg}"
        );
        assert!(
            msg.contains("modules: `pkg`, `service`, `command`"),
            "{msg}"
        );
        assert!(msg.contains("keywords: `name`, `notify`"), "{msg}");
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n      notfy: h\n",
            5,
            7,
        );
        assert!(msg.contains("(did you mean `notify`?)"), "{msg}");
    }

    #[test]
    fn an_unknown_argument_is_reported_at_itself_with_the_valid_ones() {
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg:\n        name: x\n        stat: present\n",
            6,
            9,
        );
        assert_eq!(
            msg,
            "module `pkg` has no argument `stat` (did you mean `state`?); arguments: `name`, `state`, `update_cache`"
        );
    }

    #[test]
    fn a_wrong_argument_value_is_reported_at_the_argument_when_no_template_is_involved() {
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg:\n        name: x\n        state: presnt\n",
            6,
            16,
        );
        assert!(
            msg.starts_with("module `pkg`: argument `state`: unknown variant `presnt`"),
            "{msg}"
        );
        // A missing argument has no place of its own: the module is blamed.
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {state: absent}\n",
            4,
            7,
        );
        assert!(msg.contains("name"), "{msg}");
        // With a template, the value is only known per host: no early build.
        parse_ok("- name: p\n  tasks:\n    - name: a\n      pkg: {name: x, state: \"{{ s }}\"}\n");
    }

    #[test]
    fn quoted_values_stay_strings_and_plain_ones_are_typed() {
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x, update_cache: \"true\"}\n",
            4,
            36,
        );
        assert!(
            msg.contains("argument `update_cache`: invalid type: string \"true\""),
            "{msg}"
        );
        let pb = parse_ok(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x, update_cache: true}\n",
        );
        assert_eq!(pb.plays[0].tasks[0].args["update_cache"], json!(true));
    }

    #[test]
    fn free_form_is_only_for_modules_that_have_one() {
        let pb = parse_ok("- name: p\n  tasks:\n    - name: a\n      command: 42\n");
        assert_eq!(pb.plays[0].tasks[0].args, json!({"cmd": "42"}));
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: nginx\n",
            4,
            12,
        );
        assert!(
            msg.starts_with("module `pkg` takes a mapping of arguments"),
            "{msg}"
        );
        assert!(
            msg.contains("arguments: `name`, `state`, `update_cache`"),
            "{msg}"
        );
    }

    #[test]
    fn a_module_argument_written_as_a_task_keyword_is_explained() {
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      command: ls\n      creates: /x\n",
            5,
            7,
        );
        assert_eq!(
            msg,
            "`creates` is an argument of `command`, not a task keyword: write it inside the module's \
             arguments, e.g. `command: {cmd: …, creates: …}`"
        );
        // Before the module too.
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      creates: /x\n      command: ls\n",
            4,
            7,
        );
        assert!(
            msg.starts_with("`creates` is an argument of `command`"),
            "{msg}"
        );
    }

    #[test]
    fn keyword_types_are_checked() {
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n      tags: {a: 1}\n",
            5,
            13,
        );
        assert_eq!(
            msg,
            "`tags` must be a string or a list of strings, not a mapping"
        );
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n      tags: [a, [b]]\n",
            5,
            17,
        );
        assert!(msg.contains("not a list"), "{msg}");
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n      become: yes\n",
            5,
            15,
        );
        assert_eq!(msg, "`become` must be true or false, not `yes`");
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n      loop: nginx\n",
            5,
            13,
        );
        assert!(msg.starts_with("`loop` must be a list"), "{msg}");
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n      register: my-var\n",
            5,
            17,
        );
        assert!(msg.contains("variable name"), "{msg}");
        let msg = parse_err("- name: p\n  vars: [a]\n", 2, 9);
        assert!(msg.starts_with("`vars` must be a mapping"), "{msg}");
        let msg = parse_err("- name: p\n  vars:\n    my-port: 1\n", 3, 5);
        assert!(msg.contains("not a valid variable name"), "{msg}");
        let msg = parse_err("- name: p\n  tasks: {a: 1}\n", 2, 10);
        assert!(msg.starts_with("`tasks` must be a list of tasks"), "{msg}");
    }

    #[test]
    fn when_and_templates_are_syntax_checked() {
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n      when: port !=\n",
            5,
            13,
        );
        assert!(
            msg.starts_with("`when: port !=` is not a valid expression: syntax error"),
            "{msg}"
        );
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n      when: \"{{ x }}\"\n",
            5,
            13,
        );
        assert!(msg.contains("without `{{ }}`"), "{msg}");
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: \"{{ x \"}\n",
            4,
            19,
        );
        assert!(msg.starts_with("template syntax error"), "{msg}");
    }

    #[test]
    fn notify_must_name_a_handler_of_the_play() {
        let text = "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n      notify:\n        - reload nginx\n        - restart ngnix\n  handlers:\n    - name: reload nginx\n      service: {name: nginx}\n    - name: restart nginx\n      service: {name: nginx}\n";
        let msg = parse_err(text, 7, 11);
        assert_eq!(
            msg,
            "`notify: restart ngnix`: no such handler in play `p` (did you mean `restart nginx`?); \
             handlers: `reload nginx`, `restart nginx`"
        );
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n      notify: h\n",
            5,
            15,
        );
        assert_eq!(msg, "`notify: h`: play `p` has no handlers");
    }

    #[test]
    fn handler_names_are_unique_in_a_play() {
        let text = "- name: p\n  handlers:\n    - name: h\n      service: {name: a}\n    - name: h\n      service: {name: b}\n";
        let msg = parse_err(text, 5, 13);
        assert_eq!(
            msg,
            "handler `h` is defined twice in play `p` (first at line 3, column 13)"
        );
    }

    #[test]
    fn a_task_calls_exactly_one_module() {
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      pkg: {name: x}\n      service: {name: x}\n",
            5,
            7,
        );
        assert!(msg.starts_with("a task calls exactly one module, but this one has `pkg` (line 4, column 7) and `service`"), "{msg}");
        let msg = parse_err(
            "- name: p\n  tasks:\n    - name: a\n      tags: [x]\n",
            3,
            7,
        );
        assert!(
            msg.starts_with("task `a` calls no module; modules: `pkg`"),
            "{msg}"
        );
    }

    #[test]
    fn plays_and_tasks_need_a_name() {
        let msg = parse_err("- hosts: web\n  tasks: []\n", 1, 3);
        assert_eq!(msg, "this play has no `name`");
        let msg = parse_err("- name: p\n  tasks:\n    - pkg: {name: x}\n", 3, 7);
        assert_eq!(msg, "this task has no `name`");
        let msg = parse_err("- name: \"\"\n", 1, 9);
        assert_eq!(msg, "`name` must not be empty");
    }

    #[test]
    fn unknown_play_keywords_are_reported_with_the_valid_ones() {
        let msg = parse_err("- name: p\n  host: web\n", 2, 3);
        assert!(
            msg.starts_with(
                "unknown play keyword `host` (did you mean `hosts`?); keywords: `name`, `hosts`"
            ),
            "{msg}"
        );
        let msg = parse_err("- name: p\n  pkg: {name: x}\n", 2, 3);
        assert!(
            msg.contains("tasks go in the play's `tasks:` list"),
            "{msg}"
        );
    }

    #[test]
    fn the_file_must_be_a_non_empty_list_of_plays() {
        let msg = parse_err("name: p\n", 1, 1);
        assert!(msg.contains("must hold a list"), "{msg}");
        let msg = parse_err("", 1, 1);
        assert_eq!(msg, "the playbook has no plays");
        let msg = parse_err("- just a string\n", 1, 3);
        assert!(msg.starts_with("a play must be a mapping"), "{msg}");
    }

    #[test]
    fn hosts_may_be_a_list_of_patterns() {
        let pb = parse_ok("- name: p\n  hosts: [web, db]\n");
        assert_eq!(pb.plays[0].hosts, "web,db");
    }

    #[test]
    fn the_real_registry_knows_every_module_of_the_docs() {
        let msg = parse(
            "x.yml",
            None,
            "- name: p\n  tasks:\n    - name: a\n      aptt: {}\n",
        )
        .unwrap_err()
        .message;
        for name in [
            "apt",
            "user",
            "group",
            "authorized_key",
            "file",
            "copy",
            "template",
            "line_in_file",
            "sysctl",
            "service",
            "nftables",
            "command",
            "shell",
        ] {
            assert!(
                msg.contains(&format!("`{name}`")),
                "{name} missing from: {msg}"
            );
        }
        assert!(msg.contains("did you mean `apt`?"), "{msg}");
    }
}
