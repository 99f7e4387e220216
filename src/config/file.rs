//! Layering: flag > environment > config file > default.
//!
//! clap reads flags, environment and defaults from the one declaration in
//! [`Options`]. A config file's keys are the flags' long names: every key
//! whose value did not come from a flag or the environment is handed to clap
//! as that flag, so the file is parsed and range-checked by exactly the
//! same rules. Only the namespace tables, which have no flags, are read with
//! serde.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use super::ConfigError;
use super::options::Options;
use super::policy::NamespaceTables;

/// Keys of the file that are tables rather than flags.
const TABLES: [&str; 2] = ["namespace", "default-namespace"];
/// Flags that make no sense in a file.
const NOT_IN_FILE: [&str; 4] = ["config", "check-config", "help", "version"];

/// What the command line, environment and file say, merged.
pub struct Layered {
    pub options: Options,
    pub namespaces: NamespaceTables,
    pub file: Option<PathBuf>,
}

/// Why loading failed: a command-line problem (clap prints it, and `--help`
/// lands here too) or a configuration problem naming its key.
#[derive(Debug)]
pub enum LoadError {
    Cli(clap::Error),
    Config(ConfigError),
}

impl From<ConfigError> for LoadError {
    fn from(e: ConfigError) -> Self {
        LoadError::Config(e)
    }
}

pub fn layered(args: Vec<OsString>) -> Result<Layered, LoadError> {
    let cmd = Options::command();
    let matches = cmd.clone().try_get_matches_from(&args).map_err(LoadError::Cli)?;
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        let options = Options::from_arg_matches(&matches).map_err(LoadError::Cli)?;
        return Ok(Layered { options, namespaces: NamespaceTables::default(), file: None });
    };
    let in_file = |mut e: ConfigError| {
        e.file = Some(path.clone());
        e
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| in_file(ConfigError::new("config", format!("cannot read the file: {e}"))))?;
    with_file_text(args, &matches, &text, path)
}

/// As [`layered`], with the config file's text already read (`path` names
/// it in errors). Public for the config fuzz target.
pub fn with_file_text(
    args: Vec<OsString>,
    matches: &clap::ArgMatches,
    text: &str,
    path: PathBuf,
) -> Result<Layered, LoadError> {
    let cmd = Options::command();
    let in_file = |mut e: ConfigError| {
        e.file = Some(path.clone());
        e
    };
    let mut table = text.parse::<toml::Table>().map_err(|e| in_file(ConfigError::new("(syntax)", e.message())))?;
    let namespaces = namespace_tables(&mut table).map_err(in_file)?;

    let mut extra: Vec<OsString> = Vec::new();
    let mut from_file = HashSet::new();
    for (key, value) in table {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && !NOT_IN_FILE.contains(&key.as_str()))
            .ok_or_else(|| in_file(ConfigError::new(&key, format!("unknown field `{key}`"))))?;
        let source = matches.value_source(arg.get_id().as_str());
        if matches!(source, Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        for v in values(&key, value).map_err(in_file)? {
            extra.push(format!("--{key}={v}").into());
        }
        from_file.insert(key);
    }
    if extra.is_empty() {
        let options = Options::from_arg_matches(matches).map_err(LoadError::Cli)?;
        return Ok(Layered { options, namespaces, file: Some(path) });
    }
    let all = args.into_iter().chain(extra);
    let matches = cmd.try_get_matches_from(all).map_err(|e| match culprit(&e) {
        Some(key) if from_file.contains(&key) => LoadError::Config(in_file(ConfigError::new(&key, first_line(&e)))),
        _ => LoadError::Cli(e),
    })?;
    let options = Options::from_arg_matches(&matches).map_err(LoadError::Cli)?;
    Ok(Layered { options, namespaces, file: Some(path) })
}

/// Takes the namespace tables out of the file and reads them.
fn namespace_tables(table: &mut toml::Table) -> Result<NamespaceTables, ConfigError> {
    let mut t = toml::Table::new();
    for k in TABLES {
        if let Some(v) = table.remove(k) {
            t.insert(k.to_owned(), v);
        }
    }
    serde_path_to_error::deserialize(toml::Value::Table(t)).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::new(&path, e.into_inner().to_string())
    })
}

/// A file value as the flag values clap would read.
fn values(key: &str, value: toml::Value) -> Result<Vec<String>, ConfigError> {
    let one = |v: toml::Value| match v {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err(ConfigError::new(key, "expected a string, a number or a list of them")),
    };
    match value {
        toml::Value::Array(list) => list.into_iter().map(one).collect(),
        v => one(v).map(|s| vec![s]),
    }
}

/// The long name of the flag a clap error is about.
fn culprit(e: &clap::Error) -> Option<String> {
    match e.get(ContextKind::InvalidArg)? {
        ContextValue::String(s) => {
            let name = s.strip_prefix("--")?;
            Some(name.split([' ', '=']).next().unwrap_or(name).to_owned())
        }
        _ => None,
    }
}

fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let line = text.lines().next().unwrap_or("invalid value");
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}
