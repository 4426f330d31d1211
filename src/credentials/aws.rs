//! `iam=aws`: RDS IAM tokens. (Being written.)
