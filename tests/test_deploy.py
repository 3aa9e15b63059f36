"""deploy/deploy.py against moto's SageMaker and Application Auto Scaling (in-process, no network).

moto 5 makes an endpoint InService as soon as it is created and removes it at once on delete, so the real
boto3 waiters run here and return on their first check. moto cannot make an endpoint fail; that path uses
botocore's Stubber. moto also validates instance types against an old list (no ml.g5), hence ml.g4dn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto import mock_aws

from deploy import deploy

NAME = "smollm2"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llm-endpoint:0.1.0"
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecution"
RESOURCE_ID = f"endpoint/{NAME}/variant/AllTraffic"
CREATE = [
    "create", "--wait-delay", "1", "--wait-attempts", "3", "--name", NAME, "--image-uri", IMAGE, "--role-arn", ROLE,
    "--model-data-url", "s3://models-bucket/smollm2/",
    "--instance-type", "ml.g4dn.xlarge", "--instance-count", "2", "--startup-timeout", "1200",
    "--env", "OPTION_MAX_ROLLING_BATCH_SIZE=32", "--env", "OPTION_DTYPE=fp16", "--env", "EMPTY=",
    "--max-capacity", "6", "--target-invocations", "45",
]  # fmt: skip


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with mock_aws():
        yield boto3.client("sagemaker"), boto3.client("application-autoscaling")


def test_create_builds_model_config_endpoint_and_autoscaling(aws) -> None:
    sm, aas = aws
    assert deploy.main(CREATE) == 0

    model = sm.describe_model(ModelName=NAME)
    assert model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"] == {
        "Image": IMAGE,
        "Environment": {"OPTION_MAX_ROLLING_BATCH_SIZE": "32", "OPTION_DTYPE": "fp16", "EMPTY": ""},
        "ModelDataSource": {
            "S3DataSource": {
                "S3Uri": "s3://models-bucket/smollm2/",
                "S3DataType": "S3Prefix",
                "CompressionType": "None",
            }
        },
    }
    [variant] = sm.describe_endpoint_config(EndpointConfigName=NAME)["ProductionVariants"]
    assert variant == {
        "VariantName": "AllTraffic",
        "ModelName": NAME,
        "InstanceType": "ml.g4dn.xlarge",
        "InitialInstanceCount": 2,
        "ContainerStartupHealthCheckTimeoutInSeconds": 1200,
        "ModelDataDownloadTimeoutInSeconds": 1200,
    }
    assert sm.describe_endpoint(EndpointName=NAME)["EndpointStatus"] == "InService"

    [target] = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["ScalableDimension"]) == (
        RESOURCE_ID,
        "sagemaker:variant:DesiredInstanceCount",
    )
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 6)  # floor defaults to --instance-count
    [policy] = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=RESOURCE_ID)["ScalingPolicies"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert policy["TargetTrackingScalingPolicyConfiguration"] == {
        "TargetValue": 45.0,
        "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
    }


def test_tarball_and_no_model_data(aws) -> None:
    sm, _ = aws
    deploy.create_model(sm, "tarball", IMAGE, ROLE, "s3://models-bucket/model.tar.gz", {})
    assert (
        sm.describe_model(ModelName="tarball")["PrimaryContainer"]["ModelDataUrl"] == "s3://models-bucket/model.tar.gz"
    )

    deploy.create_model(sm, "hub", IMAGE, ROLE, None, {"HF_MODEL_ID": "s3://models-bucket/smollm2/"})
    container = sm.describe_model(ModelName="hub")["PrimaryContainer"]
    assert "ModelDataUrl" not in container and "ModelDataSource" not in container
    deploy.create_endpoint_config(sm, "hub", "ml.m5.xlarge", 1, 600, with_model_data=False)
    [variant] = sm.describe_endpoint_config(EndpointConfigName="hub")["ProductionVariants"]
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 600
    assert "ModelDataDownloadTimeoutInSeconds" not in variant


def test_status_reports_endpoint_and_autoscaling(aws, capsys: pytest.CaptureFixture[str]) -> None:
    assert deploy.main(CREATE) == 0
    capsys.readouterr()
    assert deploy.main(["status", "--name", NAME]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "EndpointName": NAME,
        "EndpointStatus": "InService",
        "FailureReason": None,
        "Variants": [{"VariantName": "AllTraffic", "CurrentInstanceCount": 2, "DesiredInstanceCount": 2}],
        "Autoscaling": [{"MinCapacity": 2, "MaxCapacity": 6}],
        "ScalingPolicies": [{"PolicyName": f"{NAME}-invocations-per-instance", "TargetValue": 45.0}],
    }


def test_teardown_removes_everything_and_is_idempotent(aws) -> None:
    sm, aas = aws
    assert deploy.main(CREATE) == 0
    for _ in range(2):  # the second run finds nothing and still succeeds
        assert deploy.main(["delete", "--wait-delay", "1", "--name", NAME]) == 0
        assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
        assert aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
        assert sm.list_endpoints()["Endpoints"] == []
        assert sm.list_endpoint_configs()["EndpointConfigs"] == []
        assert sm.list_models()["Models"] == []


def test_teardown_of_a_half_created_deployment(aws) -> None:
    sm, aas = aws
    deploy.create_model(sm, NAME, IMAGE, ROLE, None, {})
    deploy.teardown(sm, aas, NAME, delay=1, max_attempts=3)
    assert sm.list_models()["Models"] == []


def test_errors_exit_nonzero_with_one_line(aws, caplog: pytest.LogCaptureFixture) -> None:
    assert deploy.main(["status", "--name", "missing"]) == 1
    assert "Could not find endpoint" in caplog.text


def test_failed_endpoint_reports_sagemakers_reason() -> None:
    """moto cannot make an endpoint fail, so the describe answer is stubbed."""
    sm = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(sm) as stub:
        stub.add_response(
            "describe_endpoint",
            {
                "EndpointName": NAME,
                "EndpointArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint/{NAME}",
                "EndpointStatus": "Failed",
                "FailureReason": "The primary container did not pass the ping health check.",
                "CreationTime": "2026-01-01T00:00:00Z",
                "LastModifiedTime": "2026-01-01T00:00:00Z",
            },
            {"EndpointName": NAME},
        )
        with pytest.raises(deploy.DeployError, match=r"status Failed\): The primary container did not pass"):
            deploy.wait(sm, "endpoint_in_service", NAME, delay=1, max_attempts=3)


def test_other_client_errors_are_not_swallowed_by_teardown() -> None:
    error = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "not allowed"}}, "DeleteModel")
    assert not deploy._already_gone(error)

    def refuse(**_: object) -> None:
        raise error

    with pytest.raises(ClientError):
        deploy._delete("model x", refuse, ModelName="x")


MINIMAL = ["create", "--name", "n", "--image-uri", "i", "--role-arn", "r", "--instance-type", "ml.m5.xlarge"]


@pytest.mark.parametrize(
    "args",
    [
        [*MINIMAL, "--max-capacity", "3"],
        [*MINIMAL, "--env", "NOEQUALS"],
        [*MINIMAL, "--startup-timeout", "7200"],
    ],
    ids=["max-without-target", "env-without-value", "timeout-out-of-range"],
)
def test_bad_arguments_are_refused(args: list[str]) -> None:
    assert deploy.parse_args(MINIMAL).command == "create"
    with pytest.raises(SystemExit) as info:
        deploy.parse_args(args)
    assert info.value.code == 2
