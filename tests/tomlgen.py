"""A minimal TOML writer for the tests' generated matrix documents (strings, numbers, lists, tables)."""

import json


def _value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def dumps(doc: dict) -> str:
    lines = []
    # Plain keys first: after a [table] header they would belong to that table.
    items = sorted(doc.items(), key=lambda kv: isinstance(kv[1], dict) or
                   (isinstance(kv[1], list) and bool(kv[1]) and all(isinstance(v, dict) for v in kv[1])))
    for key, value in items:
        if isinstance(value, dict) and all(not isinstance(v, dict) for v in value.values()):
            lines.append(f"[{key}]")
            lines += [f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()]
        elif isinstance(value, dict):  # one level of nested tables, e.g. [offload.balanced]
            for sub, table in value.items():
                lines.append(f"[{key}.{sub}]")
                lines += [f"{json.dumps(k)} = {_value(v)}" for k, v in table.items()]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for table in value:
                lines.append(f"[[{key}]]")
                lines += [f"{json.dumps(k)} = {_value(v)}" for k, v in table.items()]
        else:
            lines.append(f"{json.dumps(key)} = {_value(value)}")
    return "\n".join(lines) + "\n"
