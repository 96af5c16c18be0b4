"""The same pipeline on AWS serverless: Lambda handler, packaging, Terraform, rehearsal.

The pipeline file does not change between a laptop and AWS; what changes is
where each part runs:

- ``handler``: the Lambda entry point ``sluiceway.aws.handler.handler``. It
  turns whatever Lambda delivers (S3 notifications, SQS batches, SNS,
  EventBridge, Kinesis and DynamoDB Streams batches) into Sluiceway events,
  routes them with the pipeline's own rules and runs the function through the
  same :class:`~sluiceway.worker.Worker` code path as ``sluiceway run``, with
  the ledger's claims making SQS re-deliveries harmless.
- ``package``: the Lambda deployment zip (or a container image definition),
  with dependencies for the Lambda runtime's Python and architecture.
- ``terraform``: a Terraform module with every resource the pipeline needs,
  and IAM policies that grant each function only what it uses.
- ``rehearse``: creates the same resources through boto3 against an
  AWS-compatible endpoint and drives a file through them end to end.

Nothing here is imported by the rest of Sluiceway, so the local product does
not pay for it.
"""
