//! Reading a JSON config field by field, so that every error names the file, the dotted path of
//! the field and what was expected (HF writes nulls for unset options: treated as absent).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::ModelError;

/// A JSON object with its file and dotted path, so every error can say exactly where it is.
pub(super) struct Obj<'a> {
    map: &'a Map<String, Value>,
    file: PathBuf,
    path: String,
}

impl<'a> Obj<'a> {
    pub(super) fn new(v: &'a Value, file: &Path, path: &str) -> Result<Self, ModelError> {
        match v.as_object() {
            Some(map) => Ok(Obj {
                map,
                file: file.to_path_buf(),
                path: path.to_string(),
            }),
            None => Err(ModelError::Config {
                file: file.to_path_buf(),
                field: path.to_string(),
                msg: format!("expected a JSON object, found {}", kind_of(v)),
            }),
        }
    }

    pub(super) fn field_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(super) fn err(&self, key: &str, msg: String) -> ModelError {
        ModelError::Config {
            file: self.file.clone(),
            field: self.field_path(key),
            msg,
        }
    }

    /// The value, treating JSON null like an absent key (HF writes nulls for unset options).
    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn req<T>(
        &self,
        key: &str,
        v: Result<Option<T>, ModelError>,
    ) -> Result<T, ModelError> {
        v?.ok_or_else(|| self.err(key, "missing".into()))
    }

    pub(super) fn req_obj(&self, key: &str) -> Result<Obj<'a>, ModelError> {
        let v = self.opt_obj(key);
        self.req(key, v)
    }

    pub(super) fn opt_obj(&self, key: &str) -> Result<Option<Obj<'a>>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => Obj::new(v, &self.file, &self.field_path(key)).map(Some),
        }
    }

    pub(super) fn req_str(&self, key: &str) -> Result<&'a str, ModelError> {
        let v = self.opt_str(key);
        self.req(key, v)
    }

    pub(super) fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("expected a string, found {}", kind_of(v)))),
        }
    }

    pub(super) fn req_usize(&self, key: &str) -> Result<usize, ModelError> {
        let v = self.opt_usize(key);
        self.req(key, v)
    }

    pub(super) fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => as_usize(v).map(Some).ok_or_else(|| {
                self.err(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    pub(super) fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    pub(super) fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    pub(super) fn opt_usize_list(&self, key: &str) -> Result<Option<Vec<usize>>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    as_usize(v).ok_or_else(|| {
                        self.err(
                            key,
                            format!("expected a list of integers, found element {v}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.err(key, format!("expected a list, found {}", kind_of(v)))),
        }
    }

    /// A token id or a list of them (HF allows both for eos_token_id).
    pub(super) fn opt_token_ids(&self, key: &str) -> Result<Option<Vec<u32>>, ModelError> {
        let one = |v: &Value| -> Result<u32, ModelError> {
            as_usize(v)
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| self.err(key, format!("expected a token id, found {v}")))
        };
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items.iter().map(one).collect::<Result<_, _>>().map(Some),
            Some(v) => Ok(Some(vec![one(v)?])),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|x| usize::try_from(x).ok())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
