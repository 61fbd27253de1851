"""Runs SQL over CloudTrail files with DuckDB, as Athena would over its CloudTrail table.

Usage: duckdb_run.py ROOT DATABASE TABLE QUERY_FILE...

Loads every *.json.gz / *.json trail file under ROOT (CloudTrail's key layout,
AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/<file>) into DATABASE.TABLE with the Athena
CloudTrail table's column names and types: one row per record of "Records", field names
lowercased as Athena's SerDe reads them, JSON-valued string columns (additionaleventdata,
requestparameters, ...) kept as JSON text, and both partition layouts' columns: `timestamp`
('yyyy/MM/dd', partition projection) and region, year, month, day, taken from the key, plus
`account` (the partition an organisation trail's table adds), also from the key.

Then runs each QUERY_FILE and prints one JSON document: a list of {"columns": [...],
"rows": [[...], ...]} with every value as a string (null for SQL NULL), as Athena returns them.
"""

import gzip
import json
import os
import re
import sys
import tempfile

import duckdb

V = "VARCHAR"
# The Athena CloudTrail table (AWS documentation, partition projection variant), without the
# partition columns.
COLUMNS = {
    "eventversion": V,
    "useridentity": {
        "type": V,
        "principalid": V,
        "arn": V,
        "accountid": V,
        "invokedby": V,
        "accesskeyid": V,
        "username": V,
        "onbehalfof": {"userid": V, "identitystorearn": V},
        "sessioncontext": {
            "attributes": {"mfaauthenticated": V, "creationdate": V},
            "sessionissuer": {"type": V, "principalid": V, "arn": V, "accountid": V, "username": V},
            "ec2roledelivery": V,
            "sourceidentity": V,
        },
    },
    "eventtime": V,
    "eventsource": V,
    "eventname": V,
    "awsregion": V,
    "sourceipaddress": V,
    "useragent": V,
    "errorcode": V,
    "errormessage": V,
    "requestparameters": V,
    "responseelements": V,
    "additionaleventdata": V,
    "requestid": V,
    "eventid": V,
    "readonly": V,
    "resources": [{"arn": V, "accountid": V, "type": V}],
    "eventtype": V,
    "apiversion": V,
    "recipientaccountid": V,
    "serviceeventdetails": V,
    "sharedeventid": V,
    "vpcendpointid": V,
    "vpcendpointaccountid": V,
    "eventcategory": V,
    "addendum": {"reason": V, "updatedfields": V, "originalrequestid": V, "originaleventid": V},
    "sessioncredentialfromconsole": V,
    "edgedevicedetails": V,
    "tlsdetails": {"tlsversion": V, "ciphersuite": V, "clientprovidedhostheader": V},
}
PARTITIONS = ["account", "region", "year", "month", "day", "timestamp"]
KEY = re.compile(r"AWSLogs/(?:[^/]+/)?(\d{12})/CloudTrail/([^/]+)/(\d{4})/(\d{2})/(\d{2})/[^/]+$")


def sql_type(spec):
    if isinstance(spec, dict):
        return "STRUCT(" + ", ".join(f'"{k}" {sql_type(v)}' for k, v in spec.items()) + ")"
    if isinstance(spec, list):
        return sql_type(spec[0]) + "[]"
    return spec


def convert(value, spec):
    """A trail value shaped as the column type: keys matched case-insensitively, as the SerDe does."""
    if value is None:
        return None
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return None
        lower = {k.lower(): v for k, v in value.items()}
        return {k: convert(lower.get(k), s) for k, s in spec.items()}
    if isinstance(spec, list):
        return [convert(v, spec[0]) for v in value] if isinstance(value, list) else None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def records(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f).get("Records", [])


def athena_text(value):
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def main(argv):
    if len(argv) < 5:
        sys.exit(__doc__)
    root, database, table, query_files = argv[1], argv[2], argv[3], argv[4:]
    with tempfile.TemporaryDirectory() as scratch:
        rows_path = os.path.join(scratch, "rows.ndjson")
        with open(rows_path, "w", encoding="utf-8") as out:
            for folder, _, names in sorted(os.walk(root)):
                for name in sorted(names):
                    path = os.path.join(folder, name)
                    match = KEY.search(os.path.relpath(path, root).replace(os.sep, "/"))
                    if not match or not name.endswith((".json.gz", ".json")):
                        continue
                    account, region, year, month, day = match.groups()
                    partitions = [account, region, year, month, day, f"{year}/{month}/{day}"]
                    for record in records(path):
                        lower = {k.lower(): v for k, v in record.items()}
                        row = {c: convert(lower.get(c), s) for c, s in COLUMNS.items()}
                        row.update(zip(PARTITIONS, partitions))
                        out.write(json.dumps(row) + "\n")
        types = {c: sql_type(s) for c, s in COLUMNS.items()}
        types.update({p: V for p in PARTITIONS})
        con = duckdb.connect()
        con.execute(f'CREATE SCHEMA "{database}"')
        con.execute(
            f'CREATE TABLE "{database}"."{table}" AS SELECT * FROM read_json(?, format = \'newline_delimited\', columns = {types!r})',
            [rows_path],
        )
    results = []
    for query_file in query_files:
        with open(query_file, encoding="utf-8") as f:
            cursor = con.execute(f.read())
        results.append(
            {
                "columns": [d[0] for d in cursor.description],
                "rows": [[athena_text(v) for v in row] for row in cursor.fetchall()],
            }
        )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main(sys.argv)
