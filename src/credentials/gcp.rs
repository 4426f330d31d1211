//! `iam=gcp`: Cloud SQL IAM database login. (Being written.)
