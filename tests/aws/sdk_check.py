"""Drives a Sluice node with the AWS SDK for Python (boto3), as a Lambda user would.

Usage: sdk_check.py ENDPOINT ACCESS_KEY_ID SECRET FUNCTION BOOTSTRAP_BINARY
Prints one line per check and exits non-zero on the first failure.
"""
import base64
import hashlib
import io
import json
import sys
import zipfile
import urllib.error
import urllib.request

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

endpoint, key_id, secret, fn, bootstrap = sys.argv[1:6]


def client(secret_key):
    return boto3.client(
        "lambda",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret_key,
        config=Config(retries={"max_attempts": 1}),
    )


lam = client(secret)
names = [f["FunctionName"] for f in lam.list_functions()["Functions"]]
assert fn in names, names
print("list_functions ok")

conf = lam.get_function_configuration(FunctionName=fn)
assert conf["FunctionName"] == fn and conf["MemorySize"] == 128, conf
print("get_function_configuration ok")

out = lam.invoke(FunctionName=fn, Payload=json.dumps({"action": "echo", "sdk": "boto3"}).encode())
assert out["StatusCode"] == 200, out
assert json.loads(out["Payload"].read())["sdk"] == "boto3"
assert "FunctionError" not in out, out
print("invoke RequestResponse ok")

out = lam.invoke(FunctionName=fn, LogType="Tail", Payload=b'{"action":"log","lines":600}')
log = base64.b64decode(out["LogResult"]).decode()
request_id = out["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
assert len(base64.b64decode(out["LogResult"])) <= 4096, len(log)
assert "hello from stdout" in log and "line 599" in log and "line 0\n" not in log, log
assert f"END RequestId: {request_id}" in log, log
assert f"REPORT RequestId: {request_id}\tDuration: " in log and "Memory Size: " in log, log
out = lam.invoke(FunctionName=fn, Payload=b'{"action":"log"}')
assert "LogResult" not in out, out
print("invoke LogType Tail ok")

out = lam.invoke(FunctionName=fn, Payload=b'{"action":"error"}')
assert out["FunctionError"] == "Unhandled", out
print("invoke function error ok")

out = lam.invoke(FunctionName=fn, InvocationType="Event", Payload=b'{"action":"echo"}')
assert out["StatusCode"] == 202, out
print("invoke Event ok")

out = lam.invoke(FunctionName=fn, InvocationType="DryRun", Payload=b"{}")
assert out["StatusCode"] == 204, out
print("invoke DryRun ok")

eic = lam.put_function_event_invoke_config(
    FunctionName=fn,
    MaximumRetryAttempts=1,
    DestinationConfig={"OnFailure": {"Destination": "kafka://sdk-failed"}},
)
assert eic["MaximumRetryAttempts"] == 1, eic
assert lam.get_function_event_invoke_config(FunctionName=fn)["DestinationConfig"]["OnFailure"]["Destination"] == "kafka://sdk-failed"
print("event invoke config ok")

assert lam.put_function_concurrency(FunctionName=fn, ReservedConcurrentExecutions=5)["ReservedConcurrentExecutions"] == 5
assert lam.get_function_concurrency(FunctionName=fn)["ReservedConcurrentExecutions"] == 5
lam.delete_function_concurrency(FunctionName=fn)
print("concurrency ok")


def check_provisioned(c, requested):
    """Allocated/Available are the fleet's (a worker may have booted some already)."""
    assert c["RequestedProvisionedConcurrentExecutions"] == requested, c
    assert c["Status"] in ("IN_PROGRESS", "READY"), c
    for field in ("AllocatedProvisionedConcurrentExecutions", "AvailableProvisionedConcurrentExecutions"):
        assert 0 <= c[field] <= requested, c
    assert (c["Status"] == "READY") == (c["AllocatedProvisionedConcurrentExecutions"] == requested), c
    assert c["LastModified"].endswith("+0000"), c


def expect_error(code, call, **kwargs):
    try:
        call(**kwargs)
        raise AssertionError(f"expected {code}")
    except ClientError as e:
        assert e.response["Error"]["Code"] == code, e.response
        return e.response["Error"]["Message"]


# Provisioned concurrency: Sluice has no versions or aliases, so the qualifier is $LATEST.
pc = lam.put_provisioned_concurrency_config(FunctionName=fn, Qualifier="$LATEST", ProvisionedConcurrentExecutions=2)
assert pc["ResponseMetadata"]["HTTPStatusCode"] == 202, pc
check_provisioned(pc, 2)
check_provisioned(lam.get_provisioned_concurrency_config(FunctionName=fn, Qualifier="$LATEST"), 2)
listed = lam.list_provisioned_concurrency_configs(FunctionName=fn)["ProvisionedConcurrencyConfigs"]
assert len(listed) == 1, listed
assert listed[0]["FunctionArn"] == conf["FunctionArn"], listed
check_provisioned(listed[0], 2)
# A reservation may not drop below what is provisioned, nor provisioned rise above the reservation.
assert lam.put_function_concurrency(FunctionName=fn, ReservedConcurrentExecutions=3)["ReservedConcurrentExecutions"] == 3
message = expect_error("InvalidParameterValueException", lam.put_provisioned_concurrency_config,
                       FunctionName=fn, Qualifier="$LATEST", ProvisionedConcurrentExecutions=4)
assert "ReservedConcurrentExecutions (3)" in message, message
expect_error("InvalidParameterValueException", lam.put_function_concurrency,
             FunctionName=fn, ReservedConcurrentExecutions=1)
lam.delete_function_concurrency(FunctionName=fn)
message = expect_error("InvalidParameterValueException", lam.put_provisioned_concurrency_config,
                       FunctionName=fn, Qualifier="live", ProvisionedConcurrentExecutions=1)
assert "$LATEST" in message, message
expect_error("ResourceNotFoundException", lam.put_provisioned_concurrency_config,
             FunctionName="no-such-function", Qualifier="$LATEST", ProvisionedConcurrentExecutions=1)
check_provisioned(lam.get_provisioned_concurrency_config(FunctionName=fn, Qualifier="$LATEST"), 2)
lam.delete_provisioned_concurrency_config(FunctionName=fn, Qualifier="$LATEST")
expect_error("ProvisionedConcurrencyConfigNotFoundException", lam.get_provisioned_concurrency_config,
             FunctionName=fn, Qualifier="$LATEST")
assert lam.list_provisioned_concurrency_configs(FunctionName=fn)["ProvisionedConcurrencyConfigs"] == []
print("provisioned concurrency ok")

try:
    lam.invoke(FunctionName="no-such-function", Payload=b"{}")
    raise AssertionError("expected ResourceNotFoundException")
except ClientError as e:
    assert e.response["Error"]["Code"] == "ResourceNotFoundException", e.response
print("not found ok")

# CreateFunction with the code as a zip, as the SDK sends it.
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    info = zipfile.ZipInfo("bootstrap")
    info.external_attr = 0o755 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    with open(bootstrap, "rb") as f:
        z.writestr(info, f.read())
data = buf.getvalue()
created = lam.create_function(
    FunctionName="zipfn",
    Runtime="provided.al2023",
    Role="arn:aws:iam::000000000000:role/sluice",
    Handler="bootstrap",
    Code={"ZipFile": data},
    MemorySize=128,
)
assert created["CodeSha256"] == base64.b64encode(hashlib.sha256(data).digest()).decode(), created
assert created["CodeSize"] == len(data), created
out = lam.invoke(FunctionName="zipfn", Payload=b'{"action":"echo","zip":true}')
assert out["StatusCode"] == 200 and "FunctionError" not in out, out
assert json.loads(out["Payload"].read())["zip"] is True
try:
    lam.create_function(FunctionName="badzip", Runtime="provided.al2023", Role="arn:aws:iam::0:role/x",
                        Handler="bootstrap", Code={"ZipFile": b"not a zip"})
    raise AssertionError("a bad zip was accepted")
except ClientError as e:
    assert e.response["Error"]["Code"] == "InvalidZipFileException", e.response
print("create_function with ZipFile ok")

# The fields the AWS CLI, SAM and Terraform send are accepted, kept and returned; what Sluice
# cannot honour is refused by name.
import platform
arch = "arm64" if platform.machine() in ("aarch64", "arm64") else "x86_64"
tooled = lam.create_function(
    FunctionName="arn:aws:lambda:us-east-1:000000000000:function:tooled",
    Runtime="provided.al2023",
    Role="arn:aws:iam::000000000000:role/sluice",
    Handler="bootstrap",
    Description="made the way tools make functions",
    Code={"ZipFile": data},
    Architectures=[arch],
    Tags={"team": "streams", "env": "test"},
    PackageType="Zip",
    TracingConfig={"Mode": "Active"},
    Layers=[],
    EphemeralStorage={"Size": 1024},
)
assert tooled["FunctionName"] == "tooled", tooled
assert tooled["Architectures"] == [arch] and tooled["TracingConfig"] == {"Mode": "Active"}, tooled
arn = tooled["FunctionArn"]
for name in (arn, "000000000000:function:tooled", arn + ":$LATEST", "tooled"):
    got = lam.get_function(FunctionName=name)
    assert got["Configuration"]["FunctionName"] == "tooled", (name, got)
assert got["Tags"] == {"team": "streams", "env": "test"}, got
out = lam.invoke(FunctionName=arn, Payload=b'{"action":"echo","arn":1}')
assert json.loads(out["Payload"].read())["arn"] == 1
lam.update_function_configuration(FunctionName=arn, Description="updated by ARN", Layers=[])
assert lam.get_function_configuration(FunctionName="tooled")["Description"] == "updated by ARN"
expect_error("ResourceNotFoundException", lam.get_function,
             FunctionName="arn:aws:lambda:eu-west-1:000000000000:function:tooled")
expect_error("ResourceNotFoundException", lam.get_function, FunctionName=arn + ":7")
for bad in ({"PackageType": "Image"}, {"Layers": ["arn:aws:lambda:us-east-1:000000000000:layer:l:1"]},
            {"Architectures": ["arm64" if arch == "x86_64" else "x86_64"]}):
    try:
        lam.create_function(FunctionName="refused", Runtime="provided.al2023", Role="r",
                            Handler="bootstrap", Code={"ZipFile": data}, **bad)
        raise AssertionError(f"{bad} was accepted")
    except ClientError as e:
        assert e.response["Error"]["Code"] == "InvalidParameterValueException", e.response
        assert list(bad)[0] in e.response["Error"]["Message"], e.response
print("tooling fields and ARN names ok")

lam.tag_resource(Resource=arn, Tags={"owner": "sluice"})
lam.untag_resource(Resource=arn, TagKeys=["env"])
assert lam.list_tags(Resource=arn)["Tags"] == {"team": "streams", "owner": "sluice"}
expect_error("InvalidParameterValueException", lam.tag_resource, Resource=arn, Tags={"aws:x": "1"})
print("tags ok")

settings = lam.get_account_settings()
assert settings["AccountLimit"]["ConcurrentExecutions"] == 1000, settings
assert settings["AccountUsage"]["FunctionCount"] >= 3, settings
assert settings["AccountLimit"]["UnreservedConcurrentExecutions"] <= 1000, settings
print("account settings ok")

lam.put_function_event_invoke_config(FunctionName="tooled", MaximumRetryAttempts=1)
listed = lam.list_function_event_invoke_configs(FunctionName=arn)["FunctionEventInvokeConfigs"]
assert len(listed) == 1 and listed[0]["MaximumRetryAttempts"] == 1, listed
print("list event invoke configs ok")

try:
    client("wrong-secret").list_functions()
    raise AssertionError("a wrong secret was accepted")
except ClientError as e:
    assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 403, e.response
    assert e.response["Error"]["Code"] == "InvalidSignatureException", e.response
print("wrong secret refused ok")

try:
    urllib.request.urlopen(endpoint + "/2015-03-31/functions/")
    raise AssertionError("an unsigned request was accepted")
except urllib.error.HTTPError as e:
    assert e.code == 403, e.code
print("unsigned refused ok")
# A signed Invoke replayed with another body: refused whether or not the replay claims the
# original body's hash in x-amz-content-sha256 (the signature covers the body, as on AWS).
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
import http.client
import socket
import time
import urllib.parse

u = urllib.parse.urlparse(endpoint)


def send(method, path, body, headers):
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


path = f"/2015-03-31/functions/{fn}/invocations"
original = b'{"action":"echo","n":1}'
req = AWSRequest(method="POST", url=endpoint + path, data=original,
                 headers={"Content-Type": "application/json"})
SigV4Auth(Credentials(key_id, secret), "lambda", "us-east-1").add_auth(req)
signed = dict(req.headers.items())
status, data = send("POST", path, original, signed)
assert status == 200 and json.loads(data)["n"] == 1, (status, data)
other = b'{"action":"echo","n":2}'
claimed = dict(signed, **{"x-amz-content-sha256": hashlib.sha256(original).hexdigest()})
status, data = send("POST", path, other, claimed)
assert status == 403, ("replay with the original hash claimed", status, data)
status, data = send("POST", path, other, signed)
assert status == 403, ("replay", status, data)
unsigned = dict(signed, **{"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
status, data = send("POST", path, original, unsigned)
assert status == 403, ("UNSIGNED-PAYLOAD", status, data)
print("signed request replayed with another body refused ok")

req = AWSRequest(method="GET", url=endpoint + "/2015-03-31/no-such-operation")
SigV4Auth(Credentials(key_id, secret), "lambda", "us-east-1").add_auth(req)
status, data = send("GET", "/2015-03-31/no-such-operation", None, dict(req.headers.items()))
assert status == 404 and json.loads(data)["message"], (status, data)
print("unknown route answers Lambda-shaped JSON ok")

# An unknown access key is refused before the body is read: the 403 comes while a 60 MB body
# is still unsent.
amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
s = socket.create_connection((u.hostname, u.port), timeout=10)
s.sendall((
    f"POST {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nContent-Length: 60000000\r\n"
    f"X-Amz-Date: {amz_date}\r\nAuthorization: AWS4-HMAC-SHA256 Credential=AKIDUNKNOWN/"
    f"{amz_date[:8]}/us-east-1/lambda/aws4_request, SignedHeaders=host, Signature=00\r\n\r\n"
).encode() + b"x" * 1000)
head = s.recv(4096).split(b"\r\n")[0]
s.close()
assert b" 403" in head, head
print("unknown key refused before the body ok")
print("ALL OK")
