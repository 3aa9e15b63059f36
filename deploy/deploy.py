"""Deploy llm-endpoint to a SageMaker real-time endpoint, scale it on invocations, and tear it down.

    python deploy/deploy.py create --name my-llm --image-uri 123.dkr.ecr.us-east-1.amazonaws.com/llm-endpoint:0.1 \\
        --role-arn arn:aws:iam::123:role/SageMakerExecution --model-data-url s3://bucket/models/smollm2/ \\
        --instance-type ml.g5.xlarge --env OPTION_MAX_ROLLING_BATCH_SIZE=32 \\
        --min-capacity 1 --max-capacity 4 --target-invocations 60
    python deploy/deploy.py status --name my-llm
    python deploy/deploy.py delete --name my-llm

The model, endpoint configuration and endpoint all take `--name`. One endpoint instance is one copy of the
server; growing past one machine is target-tracking autoscaling of the variant's instance count on
SageMakerVariantInvocationsPerInstance (invocations per instance per minute). Credentials and region come
from the usual AWS environment (AWS_PROFILE, AWS_REGION, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError, WaiterError

log = logging.getLogger("deploy")

VARIANT = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DeployError(Exception):
    """A deployment step failed; the message says which resource and why."""


def resource_id(name: str) -> str:
    return f"endpoint/{name}/variant/{VARIANT}"


def scalable_target(name: str) -> dict[str, str]:
    """How Application Auto Scaling names the endpoint variant's instance count."""
    return {"ServiceNamespace": "sagemaker", "ResourceId": resource_id(name), "ScalableDimension": SCALABLE_DIMENSION}


def policy_name(name: str) -> str:
    return f"{name}-invocations-per-instance"


def model_data(url: str) -> dict[str, Any]:
    """An S3 prefix (ending in "/") is mounted uncompressed at /opt/ml/model; anything else is a model.tar.gz.

    Uncompressed is what large LLM checkpoints want: no tar to build, and SageMaker copies files directly.
    """
    if url.endswith("/"):
        return {
            "ModelDataSource": {"S3DataSource": {"S3Uri": url, "S3DataType": "S3Prefix", "CompressionType": "None"}}
        }
    return {"ModelDataUrl": url}


def create_model(
    sm: Any, name: str, image_uri: str, role_arn: str, model_data_url: str | None, env: Mapping[str, str]
) -> str:
    container: dict[str, Any] = {"Image": image_uri, "Environment": dict(env)}
    if model_data_url:
        container.update(model_data(model_data_url))
    log.info("creating model %s from %s", name, image_uri)
    return sm.create_model(ModelName=name, ExecutionRoleArn=role_arn, PrimaryContainer=container)["ModelArn"]


def create_endpoint_config(
    sm: Any, name: str, instance_type: str, instance_count: int, startup_timeout: int, with_model_data: bool
) -> str:
    """One variant. `startup_timeout` bounds both the model-data copy and the wait for /ping to answer."""
    variant: dict[str, Any] = {
        "VariantName": VARIANT,
        "ModelName": name,
        "InstanceType": instance_type,
        "InitialInstanceCount": instance_count,
        "ContainerStartupHealthCheckTimeoutInSeconds": startup_timeout,
    }
    if with_model_data:
        variant["ModelDataDownloadTimeoutInSeconds"] = startup_timeout
    log.info("creating endpoint config %s: %d x %s", name, instance_count, instance_type)
    return sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[variant])["EndpointConfigArn"]


def create_endpoint(sm: Any, name: str) -> str:
    log.info("creating endpoint %s", name)
    return sm.create_endpoint(EndpointName=name, EndpointConfigName=name)["EndpointArn"]


def wait(sm: Any, waiter: str, name: str, delay: int, max_attempts: int) -> None:
    """Block on a SageMaker waiter ('endpoint_in_service' / 'endpoint_deleted'); failures carry SageMaker's reason."""
    log.info("waiting for %s (%s, every %ds, at most %d checks)", name, waiter, delay, max_attempts)
    try:
        sm.get_waiter(waiter).wait(EndpointName=name, WaiterConfig={"Delay": delay, "MaxAttempts": max_attempts})
    except WaiterError as exc:
        last = exc.last_response or {}
        state = last.get("EndpointStatus", "unknown")
        reason = last.get("FailureReason") or str(exc)
        raise DeployError(f"endpoint {name} did not reach {waiter} (status {state}): {reason}") from exc


def attach_autoscaling(aas: Any, name: str, min_capacity: int, max_capacity: int, target_invocations: float) -> None:
    """Target tracking on invocations per instance per minute; the endpoint must already be InService."""
    target = scalable_target(name)
    log.info(
        "autoscaling %s: %d..%d instances, %.0f invocations/instance/minute",
        name,
        min_capacity,
        max_capacity,
        target_invocations,
    )
    aas.register_scalable_target(**target, MinCapacity=min_capacity, MaxCapacity=max_capacity)
    aas.put_scaling_policy(
        **target,
        PolicyName=policy_name(name),
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": target_invocations,
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
        },
    )


def _already_gone(exc: ClientError) -> bool:
    """SageMaker says ValidationException "Could not find ..."; Application Auto Scaling ObjectNotFoundException
    (moto: ValidationException "No scalable target found ..." / "No scaling policy found ...")."""
    error = exc.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", "").lower()
    if code == "ObjectNotFoundException":
        return True
    missing = ("could not find", "no scalable target", "no scaling policy")
    return code == "ValidationException" and any(text in message for text in missing)


def _delete(what: str, call: Callable[..., Any], **kwargs: Any) -> bool:
    """Run one delete call; False when the resource was not there."""
    try:
        call(**kwargs)
    except ClientError as exc:
        if not _already_gone(exc):
            raise
        log.info("%s already gone", what)
        return False
    log.info("deleted %s", what)
    return True


def teardown(sm: Any, aas: Any, name: str, delay: int, max_attempts: int) -> None:
    """Remove everything `create` made, in dependency order; resources already gone are skipped."""
    target = scalable_target(name)
    _delete(f"scaling policy {policy_name(name)}", aas.delete_scaling_policy, PolicyName=policy_name(name), **target)
    _delete(f"scalable target {resource_id(name)}", aas.deregister_scalable_target, **target)
    if _delete(f"endpoint {name}", sm.delete_endpoint, EndpointName=name):
        wait(sm, "endpoint_deleted", name, delay, max_attempts)
    _delete(f"endpoint config {name}", sm.delete_endpoint_config, EndpointConfigName=name)
    _delete(f"model {name}", sm.delete_model, ModelName=name)


def status(sm: Any, aas: Any, name: str) -> dict[str, Any]:
    """What a person checking a deployment wants on one screen."""
    endpoint = sm.describe_endpoint(EndpointName=name)
    targets = aas.describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=[resource_id(name)], ScalableDimension=SCALABLE_DIMENSION
    )["ScalableTargets"]
    policies = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource_id(name))
    return {
        "EndpointName": name,
        "EndpointStatus": endpoint["EndpointStatus"],
        "FailureReason": endpoint.get("FailureReason"),
        "Variants": [
            {k: v.get(k) for k in ("VariantName", "CurrentInstanceCount", "DesiredInstanceCount")}
            for v in endpoint.get("ProductionVariants", [])
        ],
        "Autoscaling": [{"MinCapacity": t["MinCapacity"], "MaxCapacity": t["MaxCapacity"]} for t in targets],
        "ScalingPolicies": [
            {"PolicyName": p["PolicyName"], "TargetValue": p["TargetTrackingScalingPolicyConfiguration"]["TargetValue"]}
            for p in policies["ScalingPolicies"]
        ],
    }


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not _ENV_KEY.fullmatch(key):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY like OPTION_MODEL_ID, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deploy.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait-delay", type=int, default=30, help="seconds between status checks (default 30)")
    waiting.add_argument("--wait-attempts", type=int, default=120, help="status checks before giving up (default 120)")

    create = commands.add_parser(
        "create", parents=[waiting], help="create model, endpoint config and endpoint; wait; autoscale"
    )
    create.add_argument("--name", required=True, help="name of the model, endpoint config and endpoint")
    create.add_argument("--image-uri", required=True, help="the llm-endpoint image in ECR")
    create.add_argument("--role-arn", required=True, help="SageMaker execution role (reads the image and model data)")
    create.add_argument(
        "--model-data-url",
        help="s3://.../prefix/ (uncompressed, mounted at /opt/ml/model) or s3://.../model.tar.gz; omit when "
        "HF_MODEL_ID / OPTION_MODEL_ID names the model",
    )
    create.add_argument("--instance-type", required=True, help="e.g. ml.g5.xlarge (GPU image), ml.m5.2xlarge (CPU)")
    create.add_argument("--instance-count", type=int, default=1)
    create.add_argument(
        "--startup-timeout", type=int, default=900, help="seconds for model download and for /ping to answer (60-3600)"
    )
    create.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="container environment, e.g. HF_MODEL_ID=s3://bucket/model/ (repeatable)",
    )
    create.add_argument("--min-capacity", type=int, help="autoscaling floor (default: --instance-count)")
    create.add_argument("--max-capacity", type=int, help="autoscaling ceiling; autoscaling is off without it")
    create.add_argument(
        "--target-invocations",
        type=float,
        help="invocations per instance per minute to hold (needed with --max-capacity)",
    )
    create.add_argument("--no-wait", action="store_true", help="return once the endpoint is being created")

    delete = commands.add_parser("delete", parents=[waiting], help="remove autoscaling, endpoint, config and model")
    show = commands.add_parser("status", help="print the endpoint's state and autoscaling as JSON")
    for command in (delete, show):
        command.add_argument("--name", required=True)

    args = parser.parse_args(argv)
    if args.command == "create":
        if args.max_capacity is not None and args.target_invocations is None:
            parser.error("--max-capacity needs --target-invocations (measure what one instance sustains)")
        if args.max_capacity is not None and args.no_wait:
            parser.error("autoscaling can only be attached once the endpoint is InService: drop --no-wait")
        if not 60 <= args.startup_timeout <= 3600:
            parser.error("--startup-timeout must be between 60 and 3600 seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        sm, aas = boto3.client("sagemaker"), boto3.client("application-autoscaling")
        if args.command == "create":
            create_model(sm, args.name, args.image_uri, args.role_arn, args.model_data_url, dict(args.env))
            create_endpoint_config(
                sm, args.name, args.instance_type, args.instance_count, args.startup_timeout, bool(args.model_data_url)
            )
            create_endpoint(sm, args.name)
            if args.no_wait:
                return 0
            wait(sm, "endpoint_in_service", args.name, args.wait_delay, args.wait_attempts)
            if args.max_capacity is not None:
                min_capacity = args.instance_count if args.min_capacity is None else args.min_capacity
                attach_autoscaling(aas, args.name, min_capacity, args.max_capacity, args.target_invocations)
            log.info("endpoint %s is InService", args.name)
        elif args.command == "delete":
            teardown(sm, aas, args.name, args.wait_delay, args.wait_attempts)
        else:
            print(json.dumps(status(sm, aas, args.name), indent=2))
    except (DeployError, ClientError, BotoCoreError) as exc:
        log.error("error: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
